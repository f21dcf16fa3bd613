"""Decompositions off the critical path: a worker thread, and a side stream on CUDA."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from lightning_kfac.decomposition import Eigen

#: Name prefix of the worker thread (so that tests and users can see it is gone).
THREAD_NAME = "kfac-inverse"


class BackgroundDecomposer:
    """Runs one decomposition job at a time in a worker thread.

    On CUDA the job runs on a side stream that first waits for the current stream (so the
    snapshot of the factors is complete); ``result`` makes the current stream wait for the
    side stream and records the results' memory on it. PyTorch releases the GIL inside
    linear-algebra kernels, so on CPU the job runs alongside training.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def submit(self, job: Callable[[], dict[object, Eigen | None]], inputs: list[Tensor]) -> Future:
        """Start ``job`` (which reads ``inputs``) in the background."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
        device = inputs[0].device if inputs else torch.device("cpu")
        if device.type != "cuda":
            return self._executor.submit(lambda: (job(), None))
        stream = self._streams.setdefault(device, torch.cuda.Stream(device))
        stream.wait_stream(torch.cuda.current_stream(device))
        for tensor in inputs:
            tensor.record_stream(stream)

        def run():
            with torch.cuda.device(device), torch.cuda.stream(stream):
                result = job()
                done = torch.cuda.Event()
                done.record(stream)
            return result, done

        return self._executor.submit(run)

    @staticmethod
    def result(future: Future) -> dict[object, Eigen | None]:
        """Wait for a job; its results are then safe to use on the current stream."""
        result, done = future.result()
        if done is not None:
            current = torch.cuda.current_stream()
            current.wait_event(done)
            for eigen in result.values():
                if eigen is not None:
                    eigen.vectors.record_stream(current)
                    eigen.values.record_stream(current)
        return result

    def close(self) -> None:
        """Cancel a job not yet started, wait for one running, and stop the thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
