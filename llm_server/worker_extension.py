"""Methods mixed into vLLM's workers (`worker_extension_cls`), called by name through `collective_rpc`: a name
crosses the process boundary as a string, so no function is pickled and VLLM_ALLOW_INSECURE_SERIALIZATION stays
off."""

from __future__ import annotations

VISION_PREFIXES = ("vision_model.", "mlp1.", "mlp2.", "pooling_before_gating.", "gating.")


class DvdWorkerExtension:
    model_runner: object  # provided by the vLLM worker this class is mixed into

    def dvd_vision_parameters(self) -> int:
        """Parameters of the vision tower and projectors this worker actually built (DvD expects 0)."""
        model = self.model_runner.model  # type: ignore[attr-defined]
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(VISION_PREFIXES))


QUALNAME = f"{__name__}.{DvdWorkerExtension.__name__}"
