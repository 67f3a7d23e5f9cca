"""Preprocessing: what turns a stored image into the model's input, recorded in the manifest and replayed by the
package's run.py.

Order (torchvision's ``Resize`` → ``CenterCrop`` → ``ToTensor`` → ``Normalize``): convert to ``channels`` (grey →
RGB repeats the channel, RGB → grey is ITU-R 601 luma as Pillow's ``convert("L")``), resize to ``image_size``
(bilinear, antialiased; with ``center_crop`` the shorter side is resized to the target and the middle cut out), scale
to [0, 1]. ``mean`` / ``std`` are *not* applied to the data: pfq-edge puts them inside the compiled model, in front
of its input quantizer, so every artefact takes pixels in [0, 1] and FINN's accelerator takes integer pixels with
the normalisation absorbed into its first thresholds (docs/data.md).
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pfq_edge.errors import DataError


class Preprocess(BaseModel):
    """image_size (H, W) or None (keep the stored size; all images must then share one); center_crop; channels
    1 | 3 or None (keep); mean / std per channel (or one value for all) in [0, 1] pixel units, or None."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: Optional[tuple[int, int]] = None
    center_crop: bool = False
    channels: Optional[int] = Field(None, ge=1, le=3)
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None

    @field_validator("image_size", mode="before")
    @classmethod
    def _size(cls, v):
        if isinstance(v, int):
            v = (v, v)
        if isinstance(v, (list, tuple)) and len(v) == 1:
            v = (v[0], v[0])
        return v

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _scalar(cls, v):
        return (v,) if isinstance(v, (int, float)) else v

    @field_validator("channels")
    @classmethod
    def _channels(cls, v):
        if v not in (None, 1, 3):
            raise ValueError("channels must be 1 or 3")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.image_size is not None and min(self.image_size) < 1:
            raise ValueError("image_size must be positive")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give mean and std together")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError("std must be positive")
        if self.mean is not None and len(self.mean) != len(self.std) and 1 not in (len(self.mean), len(self.std)):
            raise ValueError(f"mean has {len(self.mean)} values, std {len(self.std)}")
        if self.center_crop and self.image_size is None:
            raise ValueError("center_crop needs image_size")
        return self

    @property
    def resizes(self) -> bool:
        return self.image_size is not None

    def normalization(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std) with one value per channel, or None. Raises DataError if the counts do not fit."""
        if self.mean is None:
            return None
        mean, std = self.mean, self.std
        mean, std = (mean * channels if len(mean) == 1 else mean), (std * channels if len(std) == 1 else std)
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"--mean/--std give {max(len(self.mean), len(self.std))} values; the images have "
                            f"{channels} channel(s)")
        return tuple(mean), tuple(std)

    # --- applying it ------------------------------------------------------------------------------------------

    def pil(self, image):
        """A Pillow image → float32 tensor (C, H, W) in [0, 1]. The resize and crop are the package's run.py's own
        (export/device/run.py, ``preprocess_image``), so a device replays exactly what the compile saw."""
        import torch

        from pfq_edge.export.device.run import preprocess_image

        return torch.from_numpy(preprocess_image(_convert(image, self.channels), None, self.image_size,
                                                 self.center_crop))

    def tensor(self, images):
        """Float32 (N, C, H, W) in [0, 1] → the same after channel conversion and resize (torch, antialiased)."""
        import torch
        from torch.nn import functional as F

        x = images
        if self.channels is not None and x.shape[1] != self.channels:
            if self.channels == 3:
                x = x.repeat(1, 3, 1, 1)
            else:
                w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                x = (x * w).sum(1, keepdim=True)
        if self.image_size is not None and tuple(x.shape[2:]) != tuple(self.image_size):
            h, w = self.image_size
            if self.center_crop:
                scale = max(h / x.shape[2], w / x.shape[3])
                size = (max(h, round(x.shape[2] * scale)), max(w, round(x.shape[3] * scale)))
                x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
                top, left = (size[0] - h) // 2, (size[1] - w) // 2
                x = x[:, :, top:top + h, left:left + w]
            else:
                x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            x = x.clamp(0, 1)
        return x.contiguous()


def _convert(image, channels: int | None):
    mode = image.mode
    if channels == 1:
        return image if mode == "L" else image.convert("L")
    if channels == 3:
        return image if mode == "RGB" else image.convert("RGB")
    if mode in ("L", "RGB"):
        return image
    return image.convert("L" if mode in ("1", "I", "I;16", "F", "LA") else "RGB")


def image_channels(mode: str) -> int:
    """Channels a Pillow image of ``mode`` gives without conversion (grey modes 1, colour 3)."""
    return 1 if mode in ("1", "L", "I", "I;16", "F", "LA") else 3
