"""Serve finished runs over HTTP with Ray Serve: a FastAPI gateway in front of one deployment per model version."""
