"""vLLM's CPU worker runs each step on fewer threads while the vision server on the same cores has a batch."""

from __future__ import annotations


def share_cores_with_vision() -> None:
    """Where DVD_CORE_BUDGET names a core budget (dvd/core_budget.py; CPU hosts whose launcher shares the cores with
    a vision server), the CPU worker notes each step and runs it on its first threads only while the vision server
    has a batch. vLLM's worker refuses torch.set_num_threads after binding its threads to cores; torch's own
    setter is called, before each step, between parallel regions."""
    from dvd.core_budget import CoreBudget

    budget = CoreBudget.from_env()
    if budget is None:
        return
    try:
        from vllm.v1.worker.cpu_worker import CPUWorker
    except ImportError:  # not a CPU build
        return
    execute = CPUWorker.execute_model
    if getattr(execute, "dvd_budget", False):
        return
    import torch

    state = {"bound": 0, "now": 0}

    def execute_model(self: CPUWorker, *args: object, **kwargs: object) -> object:
        if not state["bound"]:
            state["bound"] = state["now"] = torch.get_num_threads()  # as vLLM's thread binding left it
            from vllm.logger import init_logger

            init_logger("vllm.dvd").info("core budget shared with the vision server: %d threads, %d while it "
                                         "computes", state["bound"], budget.engine_share(state["bound"]))
        want = budget.engine_threads(state["bound"])
        if want != state["now"]:
            torch._C.set_num_threads(want)
            state["now"] = want
        budget.engine_stepped(want)
        return execute(self, *args, **kwargs)

    execute_model.dvd_budget = True  # type: ignore[attr-defined]
    CPUWorker.execute_model = execute_model  # type: ignore[method-assign]
