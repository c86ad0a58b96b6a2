"""Cluster files (clusters/*.yaml): where a Ray cluster is, how to authenticate, and where its model store lives.
Validated like a job spec: strict fields, errors naming the field, exit 2."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, model_validator

from raybig.errors import SpecError
from raybig.spec import Strict, _problems, read_yaml


class HeadSpec(Strict):
    """A head `raybig cluster up` starts on this machine (loopback only)."""
    host: str = Field(default="127.0.0.1", pattern=r"^127\.0\.0\.1$|^localhost$",
                      description="Loopback only: a head for other machines is started by ray up or KubeRay.")
    port: int = Field(default=6391, ge=1024, le=65535, description="GCS port.")
    dashboard_port: int = Field(default=8291, ge=1024, le=65535, description="Dashboard and job submission port.")
    client_server_port: int = Field(default=23091, ge=1024, le=65535, description="Outside Ray's worker ports 10002-19999.")
    num_cpus: int = Field(default=2, ge=1)
    num_gpus: int = Field(default=0, ge=0)
    temp_dir: str | None = Field(default=None, description="Ray's session and log directory (default /tmp/ray); "
                                 "keep it short, Ray's socket paths must fit in 107 characters.")


class AuthSpec(Strict):
    token_env: str = Field(default="RAY_AUTH_TOKEN", description="Environment variable holding the token.")
    token_path: str | None = Field(default=None, description="File holding the token (default ~/.ray/auth_token).")


class ClusterSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    address: str | None = Field(default=None, pattern=r"^https?://", description="Job submission address "
                                "(http://HOST:8265); default: the local head's dashboard.")
    head: HeadSpec | None = None
    auth: AuthSpec = Field(default_factory=AuthSpec)
    store: str = Field(description="The model store as the cluster sees it: an absolute path (one node) or "
                       "an s3:// or gs:// URI (several nodes).")
    pip: list[str] = Field(default_factory=list, description="Extra requirements installed for submitted jobs.")

    @model_validator(mode="after")
    def _where(self):
        if self.address is None and self.head is None:
            raise SpecError([("address", "give an address, or a head section for a local cluster")])
        check_store(self.store, "store")
        return self

    @property
    def submit_address(self) -> str:
        return self.address or f"http://{self.head.host}:{self.head.dashboard_port}"


def check_store(store: str, field: str) -> None:
    """A store every process of the cluster names the same way: an absolute path, or an object-store URI."""
    if not (store.startswith("/") or store.startswith(("s3://", "gs://"))):
        raise SpecError(f"expected an absolute path or an s3:// or gs:// URI, got {store!r}", field)


def load_cluster(path: str | Path) -> ClusterSpec:
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping with name, address or head, and store")
    try:
        return ClusterSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_problems(err)) from None
