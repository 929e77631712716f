"""Local model files as opaque base models: TorchScript (``.pt``/``.ts``) and torch.export (``.pt2``).

The model must take a float32 batch ``N x C x H x W`` in ``[0, 1]`` (put any normalisation inside the
exported model) and return logits ``N x K``. The connector returns argmax labels and, unless
``label_only=True``, softmax scores. Its fingerprint is the SHA-256 of the file, so a changed file
never reuses cached answers of the old one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from blackbox_rs.errors import ConnectorError, InvalidParameterError

from .base import BaseConnector, ConnectorInfo, Prediction

__all__ = ["TorchScriptConnector", "file_sha256"]

_EXPORT_SUFFIXES = {".pt2"}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class TorchScriptConnector(BaseConnector):
    """A TorchScript or torch.export model file behind the connector protocol.

    Args:
        path: ``.pt``/``.ts`` TorchScript archive (``torch.jit.save``) or ``.pt2`` exported program
            (``torch.export.save``).
        input_shape: ``(C, H, W)`` the model expects.
        class_names: class names; or ``num_classes`` to name them ``"0" .. "K-1"``. If neither is
            given, the width of the model's output on one blank image is used.
        label_only: hide scores (simulates a label-only API; strategies that need scores refuse it).
        max_batch: most images per forward pass.
        threads: torch intra-op threads for inference (``None`` leaves torch's setting alone).

    The model is differentiable (``info.differentiable``): :meth:`forward_logits` runs it with autograd
    for gradient pass-through fitting. Loading a ``.pt2`` file uses torch.export's own format; neither
    path unpickles arbitrary objects.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        input_shape: Sequence[int],
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        label_only: bool = False,
        max_batch: int = 256,
        cost_per_query: float = 0.0,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConnectorError(f"model file not found: {self.path}")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self._model = self._load(self.path)
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != 3:
            raise InvalidParameterError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        if class_names is None:
            if num_classes is None:
                with torch.inference_mode():
                    out = self._forward(torch.zeros((1, *shape), dtype=torch.float32))
                num_classes = self._check_logits(out, 1).shape[1]
            class_names = [str(i) for i in range(int(num_classes))]
        elif num_classes is not None and num_classes != len(class_names):
            raise InvalidParameterError(
                f"num_classes={num_classes} disagrees with {len(class_names)} class_names"
            )
        self.label_only = bool(label_only)
        self._info = ConnectorInfo(
            input_shape=shape,  # type: ignore[arg-type]
            class_names=tuple(class_names),
            returns_scores=not self.label_only,
            max_batch=max_batch,
            cost_per_query=cost_per_query,
            fingerprint=f"torchscript:sha256:{file_sha256(self.path)}",
            differentiable=True,
        )

    @staticmethod
    def _load(path: Path) -> torch.nn.Module:
        try:
            if path.suffix in _EXPORT_SUFFIXES:
                module = torch.export.load(str(path)).module()
            else:
                module = torch.jit.load(str(path), map_location="cpu")
                module.eval()
        except Exception as exc:  # torch raises many unrelated types for a bad archive
            raise ConnectorError(f"cannot load model file {path}: {type(exc).__name__}: {exc}") from exc
        for p in module.parameters():
            p.requires_grad_(False)
        return module

    def _forward(self, batch: torch.Tensor) -> object:
        """Run the model; any failure inside it (a shape guard of an exported program, a dtype or
        size mismatch) becomes a :class:`ConnectorError` naming the file and the batch shape."""
        try:
            return self._model(batch)
        except Exception as exc:  # torch raises many unrelated types from inside a model
            hint = ""
            if self.path.suffix in _EXPORT_SUFFIXES and "Guard failed" in str(exc):
                hint = " (export the program with a dynamic batch dimension: dynamic_shapes={0: Dim('batch')})"
            raise ConnectorError(
                f"model {self.path.name} failed on a batch of shape {tuple(batch.shape)}: "
                f"{type(exc).__name__}: {exc}{hint}"
            ) from exc

    def _check_logits(self, out: object, n: int) -> torch.Tensor:
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != n:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConnectorError(f"model must return logits of shape (N, K) for N={n}, got {shape}")
        return out

    def forward_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Differentiable forward pass (autograd enabled); logits ``N x K``."""
        return self._check_logits(self._forward(batch), int(batch.shape[0])).float()

    def _query(self, batch: torch.Tensor) -> Prediction:
        with torch.inference_mode():
            logits = self._check_logits(self._forward(batch), int(batch.shape[0])).float()
        labels = logits.argmax(dim=1)
        scores = None if self.label_only else torch.softmax(logits, dim=1)
        return Prediction(labels=labels, scores=scores)
