"""Lossy codecs: ``fp8`` (e4m3 of square-law companded KV, per-head scales, key offsets) and KIVI-style
``int2``/``int4``/``int8``.

KIVI (Liu et al., 2024) quantizes keys per channel and values per token: key groups run along the tokens of
one channel (keys have outlier channels), value groups along the channels of one token. Each group of
``group_size`` elements stores ``bits``-bit codes plus a zero-point (its minimum) and a scale.

To reach 4-bit storage at ratio >= 3.5 with groups of 32, the per-group zero-point and scale are themselves
stored as 8-bit codes on a linear grid per (layer, tensor, KV head) with three fp32 grid parameters
(``lo``, ``zstep``, ``sstep``): 2 bytes of metadata per group instead of 4 or 8. Rounding is directed so
the bound stays exact: the stored zero ``z = lo + zc * zstep`` is at most the group minimum and the stored
scale ``s = sc * sstep`` is at least ``(max - z) / (2**bits - 1)``, so every element of a group satisfies
``|x - x_hat| <= s / 2`` (up to fp32 rounding), with ``s`` the group's stored scale.

In a chunk ``[L, T, H, C, D]`` the tensor at ``T`` index 0 (keys) is quantized per channel and every other
tensor (values) per token. A group that the chunk does not fill (``C`` or ``D`` not a multiple of the group
size) is padded by repeating its last element, which leaves its minimum and maximum unchanged.

Byte-level corruption of quantized data cannot be detected here (every byte pattern is a valid code); the
chunk blob's checksum covers that. Structural problems (names, shapes, dtypes) raise CodecError.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch

from kvtier.compression.codec import Codec, expect_parts, register_codec
from kvtier.errors import CodecError

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
META_LEVELS = 255  # 8-bit codes for the zero-point and the scale


def _check(cond: bool, codec: str, what: str) -> None:
    if not cond:
        raise CodecError(f"codec {codec!r}: {what}")


MAX_MAGNITUDE = 2.0**60  # what the lossy codecs take: their fp32 arithmetic (sums of squares too) cannot overflow
_TINY = torch.finfo(torch.bfloat16).tiny  # the smallest normal bf16 (and fp32) number, 2**-126


def largest_magnitude(kv: torch.Tensor) -> float:
    """The largest ``|x|`` of ``kv`` (nan if any is nan; 0 when empty), from its minimum and maximum: no ``|kv|``
    copy. The lossy codecs take KV whose largest magnitude is at most ``MAX_MAGNITUDE``."""
    if not kv.numel():
        return 0.0
    low, high = torch.aminmax(kv)
    return float(torch.maximum(-low, high))  # one read back (a sync on a GPU); maximum passes a nan on


def _check_kv(kv: torch.Tensor, codec: str) -> None:
    _check(kv.dim() == 5, codec, f"kv must be [L, T, H, C, D], got shape {tuple(kv.shape)}")
    largest = largest_magnitude(kv)
    _check(largest <= MAX_MAGNITUDE, codec, f"kv must be finite and within +-2**60, got a value of magnitude "
                                            f"{largest}: an inf or nan would spoil its whole head")


def _copy_in_range(dst: torch.Tensor, x: torch.Tensor) -> None:
    """``dst <- x`` (fp32), clamped to ``dst``'s dtype's range: a reconstruction may overshoot an input that was
    at the edge of it (fp16's 65504), which must not become inf."""
    if dst.dtype != torch.float32:
        limit = torch.finfo(dst.dtype).max
        x = x.clamp(-limit, limit)
    dst.copy_(x)


@register_codec
class FP8Codec(Codec):
    """float8 e4m3 codes of square-law companded KV, one bf16 scale per (layer, tensor, head): 2x smaller
    than fp16 less 0.25% of metadata (ratio 1.995 on a SmolLM2 chunk).

    e4m3 keeps 3 mantissa bits, so its error is a fixed fraction of what it encodes. The codec stores
    ``c = e4m3(u * |u|)`` with ``u = r / scale`` and decodes ``r = sign(c) * sqrt(|c|) * scale``: the square
    root halves the relative error (about ``2**-5``) over the range it keeps, ``sqrt(448 / 2**-6) = 169``
    between the largest magnitude of a head and the smallest at full precision, which is enough for KV.

    Keys (``kv[:, 0]``) have channels with large offsets nearly constant over a chunk's tokens. ``r`` is the
    keys minus each (layer, head, channel)'s mean over the chunk's tokens, stored as int8 codes times one
    bf16 step per (layer, head), except for the tokens whose keys are nearer zero than that offset (summed
    over a layer's heads). Those are attention sinks, the tokens every query attends to: their keys are small
    but far from the mean, so the offset would enlarge their error where it matters most. They are stored as
    they are, flagged by one bit per (layer, token). Values (every other tensor) have no such offsets.

    Parts: ``data`` uint8 ``[L, T, H, C, D]`` (e4m3 bits); ``scale`` bf16 ``[L, T, H]``; ``key_offset`` int8
    ``[L, H, D]``; ``key_offset_step`` bf16 ``[L, H]``; ``key_raw`` uint8 ``[L, ceil(C / 8)]`` (token ``c``'s
    flag is bit ``c % 8`` of byte ``c // 8``). Inputs must be finite (else a CodecError).
    """

    name = "fp8"
    lossless = False

    def encoded_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        L, T, H, C, D = shape
        return L * T * H * C * D + L * T * H * 2 + L * H * D + L * H * 2 + L * -(-C // 8)

    def encode(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_kv(kv, self.name)
        x = kv.to(torch.float32, copy=True)  # transformed in place, then converted to e4m3 in one pass
        keys = x[:, :1]
        mean = keys.mean(dim=3, keepdim=True)  # [L, 1, H, 1, D]
        step = (mean.abs().amax(dim=4, keepdim=True) / 127).to(torch.bfloat16).float()
        step = torch.where(step > 0, step, torch.ones_like(step))
        codes = (mean / step).round_().clamp_(-127, 127)
        offset = codes * step
        # ||k||^2 < ||k - o||^2, summed over a layer's heads and channels, is 2 k.o < ||o||^2.
        dot = torch.einsum("lhcd,lhd->lc", keys[:, 0], offset[:, 0, :, 0])
        raw = 2 * dot < offset.square().sum(dim=(1, 2, 3, 4))[:, None]  # [L, C]
        keys.sub_(offset * (~raw).view(raw.shape[0], 1, 1, -1, 1))
        amax = torch.maximum(x.amax(dim=(3, 4)), -x.amin(dim=(3, 4)))  # two reductions, no |x| copy
        # bf16 scale rounded up (its rounding is at most 2**-9): |u| <= sqrt(448), so u * |u| never saturates.
        # At least bf16's smallest normal number: a subnormal amax would round to a zero or coarse scale.
        scale = torch.where(amax > 0, (amax * ((1 + 2.0**-8) / FP8_MAX**0.5)).clamp_min(_TINY),
                            torch.ones_like(amax)).to(torch.bfloat16)
        x.div_(scale.float()[..., None, None])
        x.mul_(x.abs())
        return {"data": x.to(torch.float8_e4m3fn).view(torch.uint8), "scale": scale,
                "key_offset": codes.view(codes.shape[0], -1, codes.shape[4]).to(torch.int8),
                "key_offset_step": step.view(step.shape[0], -1).to(torch.bfloat16), "key_raw": _pack_bits(raw)}

    def decode(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        _check(out.dim() == 5, self.name, f"out must be [L, T, H, C, D], got shape {tuple(out.shape)}")
        L, T, H, C, D = out.shape
        want = {"data": (torch.uint8, (L, T, H, C, D)), "scale": (torch.bfloat16, (L, T, H)),
                "key_offset": (torch.int8, (L, H, D)), "key_offset_step": (torch.bfloat16, (L, H)),
                "key_raw": (torch.uint8, (L, -(-C // 8)))}
        expect_parts(parts, tuple(want), self.name)
        for name, (dtype, shape) in want.items():
            part = parts[name]
            _check(part.dtype == dtype and tuple(part.shape) == shape, self.name,
                   f"{name} must be {dtype} {shape}, got {part.dtype} {tuple(part.shape)}")
        x = torch.take(_sqrt_e4m3_table(out.device), parts["data"].long())  # sign(c) * sqrt(|c|) of each e4m3 code c
        x.mul_(parts["scale"].float()[..., None, None])
        offset = parts["key_offset"].float() * parts["key_offset_step"].float().unsqueeze(2)  # [L, H, D]
        kept = ~_unpack_bits(parts["key_raw"], C)  # [L, C]: tokens stored minus the offset
        x[:, 0].addcmul_(offset.unsqueeze(2), kept.float()[:, None, :, None])
        _copy_in_range(out, x)


def _pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """``[L, n]`` bool -> ``[L, ceil(n / 8)]`` uint8; flag ``i`` is bit ``i % 8`` of byte ``i // 8``."""
    L, n = flags.shape
    padded = torch.zeros((L, -(-n // 8) * 8), dtype=torch.uint8, device=flags.device)
    padded[:, :n] = flags
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=flags.device)
    return (padded.view(L, -1, 8) * weights).sum(dim=2, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`: ``[L, ceil(n / 8)]`` uint8 -> ``[L, n]`` bool."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(2) >> shifts) & 1).view(packed.shape[0], -1)[:, :n].bool()


@functools.lru_cache(maxsize=8)
def _sqrt_e4m3_table(device: torch.device) -> torch.Tensor:
    """``[256]`` fp32 on ``device``: ``sign(c) * sqrt(|c|)`` for the e4m3 value ``c`` of every byte (NaN for
    its 2 NaNs). Built once per device, on first use."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    return codes.abs().sqrt().copysign(codes).to(device)


class KIVICodec(Codec):
    """Asymmetric ``bits``-bit quantization, keys per channel and values per token, groups of ``group_size``.

    Parts, for the keys (``key_*``, from ``kv[:, :1]``) and the values (``value_*``, from ``kv[:, 1:]``,
    absent when ``T == 1``), ``T'`` tensors each:

    - ``*_codes`` uint8 ``[L, ceil(T' * H * groups * group_size * bits / 8)]``: packed codes (see ``_pack``);
    - ``*_zero``, ``*_scale`` uint8 ``[L, T', H, ...group grid]``: 8-bit codes of each group's zero and scale;
    - ``*_grid`` fp32 ``[L, T', H, 3]``: ``lo, zstep, sstep`` that turn those codes into values.
    """

    lossless = False
    bits: ClassVar[int]

    def __init__(self, group_size: int = 32) -> None:
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise CodecError(f"codec {self.name!r}: group_size must be a positive integer, got {group_size!r}")
        self.group_size = group_size

    def params(self) -> dict[str, Any]:
        return {"group_size": self.group_size}

    @property
    def levels(self) -> int:
        """Largest code: ``2**bits - 1``."""
        return (1 << self.bits) - 1

    # --- shapes ---------------------------------------------------------------------------------------
    def _padded(self, n: int) -> int:
        return -(-n // self.group_size) * self.group_size

    def _grid_shape(self, shape: tuple[int, ...], per_channel: bool) -> tuple[int, ...]:
        """Shape of the per-group metadata of a ``[L, T', H, C, D]`` tensor: one entry per group."""
        L, T, H, C, D = shape
        if per_channel:
            return (L, T, H, self._padded(C) // self.group_size, D)
        return (L, T, H, C, self._padded(D) // self.group_size)

    def _code_bytes(self, shape: tuple[int, ...], per_channel: bool) -> int:
        """Packed code bytes per layer."""
        L, T, H, C, D = shape
        n = T * H * (self._padded(C) * D if per_channel else C * self._padded(D))
        return -(-n * self.bits // 8)

    def _split(self, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], bool]]:
        """``(prefix, shape, per_channel)`` of the keys and (when ``T > 1``) the values."""
        L, T, H, C, D = shape
        split = [("key", (L, 1, H, C, D), True)]
        if T > 1:
            split.append(("value", (L, T - 1, H, C, D), False))
        return split

    def encoded_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        total = 0
        for _, sub, per_channel in self._split(tuple(shape)):
            groups = torch.Size(self._grid_shape(sub, per_channel)).numel()
            total += sub[0] * self._code_bytes(sub, per_channel) + 2 * groups + sub[0] * sub[1] * sub[2] * 12
        return total

    # --- encode ---------------------------------------------------------------------------------------
    def encode(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_kv(kv, self.name)
        parts: dict[str, torch.Tensor] = {}
        for prefix, (L, *_), per_channel in self._split(tuple(kv.shape)):
            src = kv[:, :1] if prefix == "key" else kv[:, 1:]
            groups = self._grouped(src, per_channel)
            codes, zero, scale, grid = self._quantize(groups, 4 if per_channel else 5)
            parts[f"{prefix}_codes"] = self._pack(codes.view(L, -1))
            parts[f"{prefix}_zero"] = zero
            parts[f"{prefix}_scale"] = scale
            parts[f"{prefix}_grid"] = grid
        return parts

    def _grouped(self, src: torch.Tensor, per_channel: bool) -> torch.Tensor:
        """fp32 copy of ``src [L, T', H, C, D]`` padded and viewed with a group axis of size ``group_size``:
        ``[L, T', H, C/G, G, D]`` per channel (groups along tokens), ``[L, T', H, C, D/G, G]`` per token."""
        L, T, H, C, D = src.shape
        G = self.group_size
        Cp, Dp = (self._padded(C), D) if per_channel else (C, self._padded(D))
        buf = torch.empty((L, T, H, Cp, Dp), dtype=torch.float32, device=src.device)
        buf[:, :, :, :C, :D].copy_(src)
        if Cp > C:
            buf[:, :, :, C:, :] = buf[:, :, :, C - 1 : C, :]
        if Dp > D:
            buf[..., D:] = buf[..., D - 1 : D]
        return buf.view(L, T, H, Cp // G, G, D) if per_channel else buf.view(L, T, H, C, Dp // G, G)

    def _quantize(self, x: torch.Tensor, gdim: int):
        """Quantize grouped ``x`` (group axis ``gdim``) in place into integer-valued fp32 codes; return them,
        the zero and scale codes (the group grid) and the ``[L, T', H, 3]`` fp32 grid parameters."""
        mn = x.amin(dim=gdim, keepdim=True)
        mx = x.amax(dim=gdim, keepdim=True)
        flat = (mn.shape[0], mn.shape[1], mn.shape[2], -1)
        lo = mn.reshape(flat).amin(dim=3)
        zstep = (mn.reshape(flat).amax(dim=3) - lo) / META_LEVELS
        zstep = torch.where(zstep > 0, zstep, torch.ones_like(zstep))
        zc = ((mn - _bcast(lo, mn)) / _bcast(zstep, mn)).floor_().clamp_(0, META_LEVELS)
        zero = _bcast(lo, mn) + zc * _bcast(zstep, mn)
        zc -= ((zero > mn) & (zc > 0)).float()  # directed rounding: the stored zero never exceeds the minimum
        zero = _bcast(lo, mn) + zc * _bcast(zstep, mn)
        need = (mx - zero) / self.levels
        sstep = need.reshape(flat).amax(dim=3) / META_LEVELS
        sstep = torch.where(sstep > 0, sstep.clamp_min(_TINY), torch.ones_like(sstep))  # 1 / scale stays finite
        sc = (need / _bcast(sstep, need)).ceil_().clamp_(0, META_LEVELS)
        scale = sc * _bcast(sstep, need)
        sc += ((scale < need) & (sc < META_LEVELS)).float()  # directed rounding: the stored scale covers the range
        scale = sc * _bcast(sstep, need)
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        torch.addcmul(0.5 - zero * inv, x, inv, out=x)  # (x - zero) / scale + 0.5; its floor is the rounded code
        x.clamp_(0, self.levels).floor_()
        grid = torch.stack([lo, zstep, sstep], dim=3)
        return x, zc.squeeze(gdim).to(torch.uint8), sc.squeeze(gdim).to(torch.uint8), grid

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        """``[L, n]`` integer-valued fp32 codes < 2**bits -> ``[L, ceil(n * bits / 8)]`` bytes. The row is cut
        into ``8 // bits`` contiguous slices; slice ``i`` fills bits ``i * bits`` of every byte."""
        per = 8 // self.bits
        L, n = codes.shape
        if n % per:
            codes = torch.nn.functional.pad(codes, (0, per - n % per))
        width = codes.shape[1] // per
        packed = codes[:, :width]
        for i in range(1, per):
            packed = torch.add(packed, codes[:, i * width : (i + 1) * width], alpha=1 << (i * self.bits))
        return packed.to(torch.uint8)

    # --- decode ---------------------------------------------------------------------------------------
    def decode(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        _check(out.dim() == 5, self.name, f"out must be [L, T, H, C, D], got shape {tuple(out.shape)}")
        split = self._split(tuple(out.shape))
        names = tuple(f"{p}_{s}" for p, _, _ in split for s in ("codes", "zero", "scale", "grid"))
        expect_parts(parts, names, self.name)
        for prefix, shape, per_channel in split:
            L, T, H, C, D = shape
            codes, zc, sc, grid = (parts[f"{prefix}_{s}"] for s in ("codes", "zero", "scale", "grid"))
            grid_shape = self._grid_shape(shape, per_channel)
            for part, name, want, dtype in (
                (codes, "codes", (L, self._code_bytes(shape, per_channel)), torch.uint8),
                (zc, "zero", grid_shape, torch.uint8),
                (sc, "scale", grid_shape, torch.uint8),
                (grid, "grid", (L, T, H, 3), torch.float32),
            ):
                _check(tuple(part.shape) == want and part.dtype == dtype, self.name,
                       f"{prefix}_{name} must be {dtype} {want}, got {part.dtype} {tuple(part.shape)}")
            gdim = 4 if per_channel else 5
            zero = (_bcast(grid[..., 0], zc) + zc.float() * _bcast(grid[..., 1], zc)).unsqueeze(gdim)
            scale = (sc.float() * _bcast(grid[..., 2], sc)).unsqueeze(gdim)
            Cp, Dp = (self._padded(C), D) if per_channel else (C, self._padded(D))
            x = self._unpack(codes, T * H * Cp * Dp).contiguous()
            x = x.view(L, T, H, Cp // self.group_size, self.group_size, D) if per_channel \
                else x.view(L, T, H, C, Dp // self.group_size, self.group_size)
            torch.addcmul(zero, x, scale, out=x)
            dst = out[:, :1] if prefix == "key" else out[:, 1:]
            _copy_in_range(dst, x.view(L, T, H, Cp, Dp)[:, :, :, :C, :D])

    def _unpack(self, packed: torch.Tensor, n: int) -> torch.Tensor:
        """Inverse of :meth:`_pack`: ``[L, bytes]`` -> ``[L, n]`` fp32 codes."""
        per = 8 // self.bits
        L, width = packed.shape
        codes = torch.empty((L, width * per), dtype=torch.float32, device=packed.device)
        for i in range(per):
            codes[:, i * width : (i + 1) * width] = (packed >> (i * self.bits)) & self.levels if per > 1 else packed
        return codes[:, :n]


def _bcast(param: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a ``[L, T', H]`` tensor so it broadcasts against ``like`` ``[L, T', H, ...]``."""
    return param.view(*param.shape, *([1] * (like.dim() - param.dim())))


@register_codec
class Int2Codec(KIVICodec):
    name = "int2"
    bits = 2


@register_codec
class Int4Codec(KIVICodec):
    name = "int4"
    bits = 4


@register_codec
class Int8Codec(KIVICodec):
    name = "int8"
    bits = 8
