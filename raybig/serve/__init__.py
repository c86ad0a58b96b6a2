"""Serve finished runs over HTTP with Ray Serve: one ingress deployment holding every model version, batching in-process."""
