"""Live capture during training: parameter (and gradient) snapshots written as a run goes.

:func:`track` hooks a PyTorch module: after every optimizer step that updates its
parameters (a global ``torch.optim`` step post-hook, filtered by parameter identity),
the tracker counts a step, and every ``every`` steps it copies the parameters (and
their gradients when asked) and writes a snapshot on a background thread, so training
only waits for the copy. For JAX/optax (or anything else) call :meth:`Tracker.log`
from the training loop with the step and the parameter pytree (and gradients).

Snapshots are ordinary snapshots of the model, one per captured step; gradients are
tensors named ``<weight>.grad`` with ``attrs["role"] == "gradient"`` in the same
snapshot, so every chart and analysis works on them. Writing errors are raised by
the next :meth:`Tracker.log`, :meth:`Tracker.flush` or :meth:`Tracker.close`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from weightatlas.errors import StoreError, WeightAtlasError
from weightatlas.storage import RecordsSource, Store, TensorRecord, TensorSource

__all__ = ["Tracker", "track"]


def _copied(source: TensorSource) -> RecordsSource:
    """The source's records with their data copied (training moves on meanwhile)."""
    items = []
    for r in source.records():
        items.append(TensorRecord(r.name, np.array(r.data, copy=True), source_name=r.source_name,
                                  kind=r.kind, layout=r.layout, source_layout=r.source_layout,
                                  source_shape=r.source_shape, module=r.module, param=r.param,
                                  attrs=dict(r.attrs)))
    return RecordsSource(items, label=source.label, framework=source.framework,
                         extra=dict(source.metadata()))


class Tracker:
    """Writes snapshots of a training run into a store, on a background thread.

    Args:
        store: The store (or its folder).
        model: Model name of the run.
        every: Capture every ``every``-th step (step 0 included).
        overwrite: Replace snapshots of the same steps from an earlier run.

    Example:
        >>> import jax.numpy as jnp
        >>> with Tracker(store, "run", every=2) as tracker:
        ...     for step in range(5):
        ...         params = {"dense": {"kernel": jnp.full((3, 2), float(step))}}
        ...         _ = tracker.log(step, params)
        >>> [i.step for i in store.snapshots("run")]
        [0, 2, 4]
    """

    def __init__(self, store: Store | str, model: str, *, every: int = 100,
                 overwrite: bool = False) -> None:
        if every < 1:
            raise StoreError(f"every must be at least 1, got {every}")
        self.store = store if isinstance(store, Store) else Store(store, create=True)
        self.model = model
        self.every = every
        self.overwrite = overwrite
        self.steps_written: list[int] = []
        self._queue: queue.Queue[tuple[int, RecordsSource] | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="weightatlas-tracker",
                                        daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                step, source = item
                if self._error is None:
                    self.store.write(source, self.model, step=step, overwrite=self.overwrite)
                    self.steps_written.append(step)
            except BaseException as e:  # re-raised in the training thread
                self._error = e
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, WeightAtlasError):
                raise error
            raise StoreError(f"{self.store.root}: writing a snapshot of {self.model} failed: "
                             f"{error}") from error

    def due(self, step: int) -> bool:
        """Whether ``step`` is one to capture."""
        return step % self.every == 0

    def submit(self, step: int, source: TensorSource) -> None:
        """Queue a snapshot of ``source`` (copied now) for ``step``."""
        self._raise()
        if self._closed:
            raise StoreError(f"tracker of {self.model} is closed")
        self._queue.put((step, _copied(source)))

    def log(self, step: int, params: Any, grads: Any = None) -> bool:
        """Capture ``params`` (and ``grads``) at ``step`` if it is due; return whether it was.

        ``params`` is anything :func:`weightatlas.adapters.jax.from_pytree` reads (Flax
        and optax parameter pytrees, NNX or Equinox modules, dicts of arrays) or a
        ``torch.nn.Module`` (then ``grads=True`` takes its ``.grad``).
        """
        self._raise()
        if not self.due(step):
            return False
        self.submit(step, _source(params, grads))
        return True

    def flush(self) -> None:
        """Wait until every queued snapshot is written; raise a writing error if any."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        """Flush, stop the writer thread (and unhook a tracked module)."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _source(params: Any, grads: Any) -> TensorSource:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(params, torch.nn.Module):
        from weightatlas.adapters.torch import from_module

        return from_module(params, gradients=bool(grads))
    from weightatlas.adapters.jax import from_pytree

    source = from_pytree(params)
    if grads is None:
        return source
    records = list(_copied(source).items)
    for r in from_pytree(grads).records():
        records.append(TensorRecord(f"{r.name}.grad", np.array(r.data, copy=True),
                                    source_name=f"{r.source_name}.grad", kind=r.kind,
                                    layout=r.layout, source_layout=r.source_layout,
                                    source_shape=r.source_shape,
                                    attrs={**dict(r.attrs), "role": "gradient"}))
    return RecordsSource(records, label=source.label, framework=source.framework,
                         extra=dict(source.metadata()))


class _ModuleTracker(Tracker):
    """A tracker bound to a torch module through an optimizer step hook."""

    def __init__(self, module: Any, store: Store | str, model: str, *, every: int,
                 gradients: bool, overwrite: bool, start: int) -> None:
        super().__init__(store, model, every=every, overwrite=overwrite)

        self.module = module
        self.gradients = gradients
        self.step = start
        self._params = {id(p) for p in module.parameters()}
        self._hook: Callable[[], None] | None = None

        def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
            if any(id(p) in self._params for g in optimizer.param_groups for p in g["params"]):
                self.step += 1
                if self.due(self.step):
                    from weightatlas.adapters.torch import from_module

                    self.submit(self.step, from_module(module, gradients=self.gradients))

        from torch.optim.optimizer import register_optimizer_step_post_hook

        handle = register_optimizer_step_post_hook(after_step)
        self._hook = handle.remove
        # The starting point, before any update.
        if self.due(self.step):
            from weightatlas.adapters.torch import from_module

            self.submit(self.step, from_module(module))

    def close(self) -> None:
        if self._hook is not None:
            self._hook()
            self._hook = None
        super().close()


def track(module: Any, store: Store | str, *, model: str | None = None, every: int = 100,
          gradients: bool = False, overwrite: bool = False, start: int = 0) -> Tracker:
    """Capture a PyTorch module's parameters every ``every`` optimizer steps.

    The returned tracker counts the optimizer steps that update the module's
    parameters (any optimizer), writes a snapshot at step ``start`` right away and then
    at every multiple of ``every``, with the gradients when ``gradients`` is true (they
    are still there after ``optimizer.step()``). Close it (or use it as a context
    manager) to flush the last snapshots and remove the hook.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 2)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> with track(net, store, model="tiny", every=2, gradients=True):
        ...     for _ in range(4):
        ...         opt.zero_grad()
        ...         net(torch.ones(1, 3)).sum().backward()
        ...         opt.step()
        >>> [i.step for i in store.snapshots("tiny")], store.snapshot("tiny@2").names
        ([0, 2, 4], ['weight', 'bias', 'weight.grad', 'bias.grad'])
    """
    return _ModuleTracker(module, store, model or type(module).__name__, every=every,
                          gradients=gradients, overwrite=overwrite, start=start)
