import os

if os.environ.get("LAZY_KV") == "1":
    import contextlib

    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.worker import kv_connector_model_runner_mixin as m

    @staticmethod
    @contextlib.contextmanager
    def _get_kv_connector_output(scheduler_output, defer_finalize=False):
        yield KVConnectorOutput()

    m.KVConnectorModelRunnerMixin._get_kv_connector_output = _get_kv_connector_output
