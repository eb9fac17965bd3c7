"""Codecs: lossless round trips are bit-exact, quantization stays within the bound of its bit width, every
codec decodes one layer alone, and bad names, parameters or data raise CodecError."""

from __future__ import annotations

import pytest
import torch

from kvtier.compression import available_codecs, get_codec
from kvtier.errors import CodecError

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# [L, T, H, C, D]: tokens not a multiple of the group, head_dim 64 and 128, a single token, MLA-like T == 1.
AWKWARD = [(2, 2, 3, 37, 64), (1, 2, 2, 100, 128), (2, 2, 1, 1, 64), (1, 1, 2, 45, 128)]
QUANT = ["int2", "int4", "int8"]
LOSSLESS = ["zstd", "lz4"]


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A tensor of random bit patterns (NaNs, infinities and subnormals included)."""
    g = torch.Generator().manual_seed(seed)
    size = torch.Size(shape).numel() * dtype.itemsize
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g).view(dtype).view(shape)


def random_kv(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian KV with a few outlier channels in the keys, as real keys have."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(shape, generator=g)
    kv[:, 0, ..., :3] = kv[:, 0, ..., :3] * 8 + 5
    return kv.to(dtype)


def roundtrip(codec, kv: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    parts = codec.encode(kv)
    out = torch.empty_like(kv)
    codec.decode(parts, out)
    return parts, out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("name", LOSSLESS)
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", AWKWARD)
def test_lossless_roundtrip_random_bits(name, shuffle, dtype, shape):
    codec = get_codec(name, shuffle=shuffle)
    kv = random_bits(shape, dtype)
    parts, out = roundtrip(codec, kv)
    assert same_bits(out, kv)
    assert all(t.shape[0] == shape[0] for t in parts.values())


@pytest.mark.model
@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_roundtrip_real_kv(name, real_kv):
    codec = get_codec(name)
    parts, out = roundtrip(codec, real_kv)
    assert same_bits(out, real_kv)
    stored = sum(t.nbytes for t in parts.values())
    if name == "zstd":  # entropy coding gains on the shuffled exponent bytes; lz4 has none and gains nothing
        assert stored < real_kv.nbytes
    noncontiguous = real_kv.transpose(3, 4)
    _, out = roundtrip(codec, noncontiguous)
    assert same_bits(out, noncontiguous)


def group_scales(codec, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Each element's stored quantization step ``[L, T, H, C, D]``, from the parts as the codec documents
    them: 8-bit scale codes per group times the grid's ``sstep``."""
    L, T, H, C, D = shape
    G = codec.group_size
    steps = []
    for prefix in ("key", "value")[: min(T, 2)]:
        grid = parts[f"{prefix}_grid"]
        scale = parts[f"{prefix}_scale"].float() * grid[..., 2][..., None, None]
        if prefix == "key":  # groups along tokens: [L, 1, H, C/G, D]
            steps.append(scale.repeat_interleave(G, dim=3)[:, :, :, :C])
        else:  # groups along channels: [L, T-1, H, C, D/G]
            steps.append(scale.repeat_interleave(G, dim=4)[..., :D])
    return torch.cat(steps, dim=1)


def rounding(dtype: torch.dtype) -> float:
    """Relative rounding error of storing a value in ``dtype``."""
    return {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-23}[dtype]


@pytest.mark.parametrize("name", QUANT)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", AWKWARD)
@pytest.mark.parametrize("group_size", [32, 24])
def test_quantization_error_within_half_a_step(name, dtype, shape, group_size):
    codec = get_codec(name, group_size=group_size)
    kv = random_kv(shape, dtype)
    parts, out = roundtrip(codec, kv)
    x, y = kv.float(), out.float()
    step = group_scales(codec, parts, shape)
    # Rounding to the nearest code: at most half a step, plus fp32 arithmetic and the output dtype's rounding.
    bound = step / 2 * (1 + 1e-5) + y.abs() * rounding(dtype) + 1e-6
    assert bool(((x - y).abs() <= bound).all())
    # The step is what the bit width implies for the group's range, widened only by the 8-bit metadata grid:
    # the zero may sit up to one zero-grid step below the minimum, the scale one scale-grid step above.
    levels = 2**codec.bits - 1
    G = group_size
    for t in range(shape[1]):
        v = x[:, t : t + 1]
        dim = 3 if t == 0 else 4  # keys: groups along tokens; values: groups along channels
        pad = -v.shape[dim] % G
        if pad:
            v = torch.cat([v, v.narrow(dim, v.shape[dim] - 1, 1).expand(*[pad if d == dim else -1 for d in range(5)])], dim=dim)
        grouped = v.unflatten(dim, (-1, G))
        low, high = grouped.amin(dim + 1), grouped.amax(dim + 1)
        zero_step = (low.amax(dim=(3, 4), keepdim=True) - low.amin(dim=(3, 4), keepdim=True)) / 255
        need = (high - low + zero_step) / levels
        widest = ((high - low).amax(dim=(3, 4), keepdim=True) + zero_step) / levels
        ideal = ((high - low) / levels).repeat_interleave(G, dim=dim).narrow(dim, 0, shape[dim])
        most = (need + widest / 255).repeat_interleave(G, dim=dim).narrow(dim, 0, shape[dim])
        got = step[:, t : t + 1]
        assert bool((got >= ideal * (1 - 1e-5)).all())
        assert bool((got <= most * (1 + 1e-5) + 1e-7).all())


def e4m3_roundtrip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).to(torch.float8_e4m3fn).float() * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", AWKWARD)
def test_fp8_error_within_e4m3_precision(dtype, shape):
    codec = get_codec("fp8")
    kv = random_kv(shape, dtype)
    parts, out = roundtrip(codec, kv)
    x, y = kv.float(), out.float()
    # What is quantized: the keys minus their stored per-channel offset (the fp16 mean over the tokens), the
    # values as they are; the key scales are per channel, the value scales per head.
    offset = parts["key_offset"].float().unsqueeze(3)
    assert torch.allclose(offset, x[:, :1].mean(dim=3, keepdim=True), rtol=2.0**-10, atol=1e-4)
    residual = torch.cat([x[:, :1] - offset, x[:, 1:]], dim=1)
    scales = [parts["key_scale"].unsqueeze(3)]
    if shape[1] > 1:
        scales.append(parts["value_scale"][..., None, None].expand(shape[0], shape[1] - 1, shape[2], 1, shape[4]))
    scale = torch.cat(scales, dim=1)
    # Each scale maps the largest magnitude it covers to 448 (scale 1 where all it covers is 0).
    amax = [residual[:, :1].abs().amax(dim=3, keepdim=True)]
    if shape[1] > 1:
        amax.append(residual[:, 1:].abs().amax(dim=(3, 4), keepdim=True).expand_as(scale[:, 1:]))
    amax = torch.cat(amax, dim=1)
    assert torch.allclose(scale * 448, torch.where(amax > 0, amax, torch.full_like(amax, 448.0)))
    # e4m3: 3 mantissa bits (relative error <= 2**-4 of what is quantized), subnormal spacing 2**-9 (absolute
    # <= 2**-10 * scale); then fp32 arithmetic and the output dtype's rounding.
    bound = residual.abs() * 2.0**-4 + scale * 2.0**-10 + y.abs() * rounding(dtype) + 1e-6 * (x.abs() + 1)
    assert bool(((x - y).abs() <= bound).all())
    # The key offsets pay: the keys' error is well under that of e4m3 with one scale per (layer, head).
    keys = x[:, :1]
    plain = e4m3_roundtrip(keys, keys.abs().amax(dim=(3, 4), keepdim=True).clamp(min=1e-30) / 448)
    if shape[3] > 1:
        assert float((y[:, :1] - keys).norm()) < 0.9 * float((plain - keys).norm())


@pytest.mark.parametrize("name", ["raw", "fp8", *QUANT, *LOSSLESS])
def test_one_layer_decodes_alone(name):
    codec = get_codec(name)
    kv = random_kv((3, 2, 2, 40, 64), torch.float16)
    parts, full = roundtrip(codec, kv)
    for layer in range(3):
        out = torch.empty_like(kv[layer : layer + 1])
        codec.decode({k: v[layer : layer + 1] for k, v in parts.items()}, out)
        assert same_bits(out, full[layer : layer + 1])


@pytest.mark.parametrize("name", ["raw", "fp8", *QUANT, *LOSSLESS])
def test_encoded_nbytes_and_ratio(name):
    """The fixed-rate codecs predict their size exactly; on a SmolLM2 fp16 chunk the ratios meet issue 3."""
    codec = get_codec(name)
    shape = (30, 2, 3, 256, 64)
    kv = random_kv(shape, torch.float16)
    stored = sum(t.nbytes for t in codec.encode(kv).values())
    if not codec.lossless:
        assert stored == codec.encoded_nbytes(shape, torch.float16)
    ratio = kv.nbytes / stored
    minimum = {"fp8": 1.95, "int2": 5.0, "int4": 3.5, "int8": 1.8}
    if name in minimum:
        assert ratio >= minimum[name]


def test_params_rebuild_the_codec():
    for name in available_codecs():
        codec = get_codec(name)
        again = get_codec(name, **codec.params())
        assert again.params() == codec.params()
    assert get_codec("int4", group_size=64).params() == {"group_size": 64}


def test_unknown_codec_and_bad_parameters():
    with pytest.raises(CodecError, match="unknown codec 'int3'.*int4"):
        get_codec("int3")
    with pytest.raises(CodecError, match="group_size"):
        get_codec("int4", group_size=0)
    with pytest.raises(CodecError, match="bad parameters"):
        get_codec("fp8", bits=3)
    with pytest.raises(CodecError, match="level"):
        get_codec("lz4", level=99)


@pytest.mark.parametrize("name", LOSSLESS)
def test_corrupt_lossless_data(name):
    codec = get_codec(name)
    kv = random_kv((2, 2, 2, 64, 64), torch.float16)
    parts = codec.encode(kv)
    out = torch.empty_like(kv)
    n = int(parts["nbytes"][0])
    for position in (0, n // 2, n - 1):  # frame header, payload, checksum
        bad = {k: v.clone() for k, v in parts.items()}
        bad["data"][0, position] ^= 0x5A
        with pytest.raises(CodecError):
            codec.decode(bad, out)
    truncated = {"data": parts["data"], "nbytes": parts["nbytes"] - 5}
    with pytest.raises(CodecError):
        codec.decode(truncated, out)
    garbage = {"data": random_bits(tuple(parts["data"].shape), torch.uint8), "nbytes": parts["nbytes"]}
    with pytest.raises(CodecError):
        codec.decode(garbage, out)
    too_long = {"data": parts["data"], "nbytes": parts["nbytes"] + parts["data"].shape[1]}
    with pytest.raises(CodecError, match="do not fit"):
        codec.decode(too_long, out)


@pytest.mark.parametrize("name", ["raw", "fp8", *QUANT, *LOSSLESS])
def test_parts_that_do_not_match(name):
    codec = get_codec(name)
    kv = random_kv((2, 2, 2, 40, 64), torch.float16)
    parts = codec.encode(kv)
    out = torch.empty_like(kv)
    with pytest.raises(CodecError):
        codec.decode({}, out)
    with pytest.raises(CodecError):
        codec.decode({**parts, "extra": torch.zeros(2)}, out)
    with pytest.raises(CodecError):  # a chunk of another shape
        codec.decode(parts, torch.empty(2, 2, 2, 48, 64, dtype=torch.float16))
    first = sorted(parts)[0]
    wrong = {**parts, first: parts[first].flatten()[:-1]}
    with pytest.raises(CodecError):
        codec.decode(wrong, out)
