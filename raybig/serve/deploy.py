"""The import path `serve deploy` (and a KubeRay RayService) uses to build raybig's Serve application.

    applications:
    - name: raybig
      import_path: raybig.serve.deploy:app
      args: {runs: ["digits-cnn:v1=/models/digits-cnn"]}   # trust_code: true for python models (user code)
"""
from raybig.serve.app import build_app, entry_from_arg


def app(args: dict):
    """An application builder: Serve calls it with the config's `args`."""
    return build_app([entry_from_arg(run, bool(args.get("trust_code"))) for run in args["runs"]])
