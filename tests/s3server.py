"""An S3-compatible server (moto) on 127.0.0.1 for tests of object-store model stores; no cloud involved."""
import logging
import os
from contextlib import contextmanager

# Credentials the server accepts; processes started while it runs (a Ray head, its jobs) inherit them.
S3_ENV = {"AWS_ACCESS_KEY_ID": "raybig-test", "AWS_SECRET_ACCESS_KEY": "raybig-test",
          "AWS_EC2_METADATA_DISABLED": "true"}  # no instance metadata lookups on a machine without a cloud


@contextmanager
def s3_bucket(bucket: str = "raybig"):
    """Yields the URI of a store in a fresh bucket, e.g. s3://raybig/store?endpoint_override=127.0.0.1:PORT&..."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir(bucket)
        yield f"s3://{bucket}/store?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
