"""The sdpa options shared by the variants (``refattn.attention.options``): one definition, mirrored
from ``refattn.sdpa``; every variant shows them in its signature, names a typo's closest option and
refuses, with its reason, an option it cannot take; a valid call is the undecorated function's."""

import inspect
import pydoc
import re

import numpy as np
import pytest

import refattn
from refattn import lowp
from refattn.adapters import torch as torch_adapter
from refattn.attention import allocation, cache, loops, multihead, relative, sparse, tiled
from refattn.attention import sdpa as sdpa_mod
from refattn.attention.options import BACKEND, RETURN_LSE, SDPA_KEYWORDS, SDPA_OPTIONS, takes_sdpa_options
from refattn.testing import compare

KW = inspect.Parameter.KEYWORD_ONLY
MODULES = (multihead, relative, sparse, tiled, cache, loops, allocation, lowp, compare, torch_adapter)
# Public functions whose ``**kwargs`` are not sdpa options: the torch keyword arguments of ``fn``.
NOT_OPTIONS = {"run_callable", "check_callable"}


def _keyword_only(fn, drop=()):
    return [
        (p.name, p.default) for p in inspect.signature(fn).parameters.values() if p.kind is KW and p.name not in drop
    ]


# ---- the shared definition mirrors refattn.sdpa --------------------------------------------------


def test_the_shared_definition_is_sdpas_keyword_only_parameters():
    assert [(o.name, o.default) for o in SDPA_KEYWORDS] == _keyword_only(refattn.sdpa)
    assert SDPA_KEYWORDS == SDPA_OPTIONS + (RETURN_LSE, BACKEND)
    assert all(o.doc and "\n" not in o.doc for o in SDPA_KEYWORDS)


def test_the_forwarded_options_are_what_validate_and_sdpa_backward_take():
    assert [(o.name, o.default) for o in SDPA_OPTIONS] == _keyword_only(sdpa_mod.validate, drop=("names",))
    expected = [(o.name, o.default) for o in SDPA_OPTIONS + (BACKEND,)]
    assert _keyword_only(refattn.sdpa_backward, drop=("d_lse", "saved")) == expected


# ---- one valid call per decorated function -------------------------------------------------------


def _qkv(rng, shape=(1, 2, 3, 4)):
    return tuple(rng.standard_normal(shape) for _ in range(3))


def _mha(rng):
    params = refattn.MHAParams(*(0.5 * rng.standard_normal((8, 8)) for _ in range(4)))
    return rng.standard_normal((2, 3, 8)), params


def _gate(rng):
    return refattn.AllocationGate(rng.standard_normal((4, 3)), rng.standard_normal(3), rng.standard_normal(3), 0.1)


def _decode_inputs(rng):
    q = rng.standard_normal((2, 2, 1, 4))
    kc, vc = rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((2, 2, 5, 4))
    return q, kc, vc


def _candidate(rng):
    q, k, v = _qkv(rng)
    return (refattn.sdpa(q, k, v, causal=True) + 1e-14, q, k, v)


# name -> (function, builder rng -> (args, own keyword arguments), sdpa options of a valid call)
CASES = {
    "multihead_attention": (
        refattn.multihead_attention,
        lambda rng: (_mha(rng), {"num_heads": 2}),
        {"causal": True, "softcap": 2.0},
    ),
    "multihead_attention_backward": (
        refattn.multihead_attention_backward,
        lambda rng: ((rng.standard_normal((2, 3, 8)), *_mha(rng)), {"num_heads": 2}),
        {"causal": True, "softcap": 2.0},
    ),
    "loops.multihead_attention": (
        loops.multihead_attention,
        lambda rng: (_mha(rng), {"num_heads": 2}),
        {"causal": True, "scale": 0.5},
    ),
    "loops.sdpa": (loops.sdpa, lambda rng: (_qkv(rng), {}), {"causal": True, "empty_rows": "nan"}),
    "relative_attention": (
        refattn.relative_attention,
        lambda rng: ((*_qkv(rng), rng.standard_normal((3, 4)), rng.standard_normal((3, 4))), {"max_distance": 1}),
        {"causal": True, "sinks": np.array([0.3, -0.2])},
    ),
    "relative_attention_backward": (
        refattn.relative_attention_backward,
        lambda rng: (
            (rng.standard_normal((1, 2, 3, 4)), *_qkv(rng), rng.standard_normal((3, 4)), rng.standard_normal((3, 4))),
            {"max_distance": 1},
        ),
        {"causal": True, "sinks": np.array([0.3, -0.2])},
    ),
    "topk_attention": (
        refattn.topk_attention,
        lambda rng: (_qkv(rng), {"top_k": 2}),
        {"causal": True, "scale": 0.7},
    ),
    "topk_attention_backward": (
        refattn.topk_attention_backward,
        lambda rng: ((rng.standard_normal((1, 2, 3, 4)), *_qkv(rng)), {"top_k": 2}),
        {"causal": True, "scale": 0.7},
    ),
    "sdpa_chunked": (
        tiled.sdpa_chunked,
        lambda rng: (_qkv(rng), {"chunk_size": 2}),
        {"causal": True, "bias": np.linspace(-1.0, 1.0, 9).reshape(3, 3)},
    ),
    "sdpa_chunked_backward": (
        tiled.sdpa_chunked_backward,
        lambda rng: ((rng.standard_normal((1, 2, 3, 4)), *_qkv(rng)), {"chunk_size": 2}),
        {"causal": True, "bias": np.linspace(-1.0, 1.0, 9).reshape(3, 3)},
    ),
    "sdpa_online": (
        tiled.sdpa_online,
        lambda rng: (_qkv(rng), {"block_q": 2, "block_k": 2}),
        {"window": (1, None), "softcap": 3.0},
    ),
    "sdpa_online_backward": (
        tiled.sdpa_online_backward,
        lambda rng: ((rng.standard_normal((1, 2, 3, 4)), *_qkv(rng)), {"block_q": 2, "block_k": 2}),
        {"window": (1, None), "softcap": 3.0},
    ),
    "decode": (
        cache.decode,
        lambda rng: (_decode_inputs(rng), {"cache_lengths": np.array([3, 5])}),
        {"causal": True, "sinks": np.array([0.5, -1.0])},
    ),
    "decode_backward": (
        cache.decode_backward,
        lambda rng: ((rng.standard_normal((2, 2, 1, 4)), *_decode_inputs(rng)), {"cache_lengths": np.array([3, 5])}),
        {"causal": True, "sinks": np.array([0.5, -1.0])},
    ),
    "allocation_attention": (
        refattn.allocation_attention,
        lambda rng: ((*_qkv(rng), _gate(rng)), {}),
        {"causal": True, "empty_rows": "uniform"},
    ),
    "allocation_attention_backward": (
        refattn.allocation_attention_backward,
        lambda rng: ((rng.standard_normal((1, 2, 3, 4)), *_qkv(rng), _gate(rng)), {}),
        {"causal": True, "empty_rows": "uniform"},
    ),
    "sdpa_twin": (lowp.sdpa_twin, lambda rng: (_qkv(rng), {"dtype": "bfloat16"}), {"causal": True, "scale": 0.5}),
    "sdpa_twin_backward": (
        lowp.sdpa_twin_backward,
        lambda rng: ((rng.standard_normal((1, 2, 3, 4)), *_qkv(rng)), {"dtype": "bfloat16"}),
        {"causal": True, "scale": 0.5},
    ),
    "check_attention": (compare.check_attention, lambda rng: (_candidate(rng), {"dtype": "float64"}), {"causal": True}),
    "assert_attention_close": (
        compare.assert_attention_close,
        lambda rng: (_candidate(rng), {"dtype": "float64"}),
        {"causal": True},
    ),
    "translate_options": (torch_adapter.translate_options, lambda rng: (_qkv(rng), {}), {"causal": True}),
    "torch_sdpa": (
        torch_adapter.torch_sdpa,
        lambda rng: (_qkv(rng), {"d_out": rng.standard_normal((1, 2, 3, 4))}),
        {"causal": True, "scale": 0.5},
    ),
    "check_torch": (
        torch_adapter.check_torch,
        lambda rng: (_qkv(rng), {"d_out": rng.standard_normal((1, 2, 3, 4))}),
        {"causal": True},
    ),
}
NEEDS_TORCH = {"torch_sdpa", "check_torch"}


def _call(name, **options):
    fn, build, _ = CASES[name]
    args, own = build(np.random.default_rng(0))
    return fn(*args, **own, **options)


def test_every_decorated_function_has_a_case_and_every_options_function_is_decorated():
    decorated, undecorated = set(), []
    for module in MODULES:
        for n in module.__all__:
            fn = getattr(module, n)
            if not inspect.isfunction(fn):
                continue
            if hasattr(fn, "sdpa_options"):
                decorated.add(fn.sdpa_options.name)
            elif n not in NOT_OPTIONS and any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()
            ):
                undecorated.append(f"{module.__name__}.{n}")
    assert decorated == set(CASES)
    assert undecorated == []


@pytest.mark.parametrize("name", CASES)
def test_a_typo_names_the_closest_option(name):
    with pytest.raises(
        refattn.RefAttnError,
        match=rf"^{re.escape(name)}: unknown option 'casual' \(did you mean 'causal'\?\); options: .*\bcausal\b",
    ):
        _call(name, casual=True)
    with pytest.raises(refattn.RefAttnError, match=rf"^{re.escape(name)}: unknown option 'frobnicate'; options: "):
        _call(name, frobnicate=1)


def test_the_error_text_users_see():
    with pytest.raises(refattn.RefAttnError) as e:
        _call("multihead_attention", casual=True)
    assert str(e.value) == (
        "multihead_attention: unknown option 'casual' (did you mean 'causal'?); options: num_heads, num_kv_heads, "
        "kv, head_mask, mask, bias, causal, window, align, chunk, sink_tokens, q_lengths, k_lengths, k_starts, "
        "scale, softcap, sinks, dropout_p, dropout_mask, empty_rows, backend"
    )
    assert isinstance(e.value, ValueError)
    with pytest.raises(
        refattn.RefAttnError, match=r"^multihead_attention: unknown option 'num_head' \(did you mean 'num_heads'\?\)"
    ):
        refattn.multihead_attention(*_mha(np.random.default_rng(0)), num_head=2)
    with pytest.raises(
        refattn.RefAttnError, match=r"^sdpa_online: unknown option 'block_kk' \(did you mean 'block_k'\?\)"
    ):
        _call("sdpa_online", block_kk=3)


@pytest.mark.parametrize("name", CASES)
def test_the_signature_lists_every_sdpa_option_it_takes(name):
    fn = CASES[name][0]
    spec = fn.sdpa_options
    sig = inspect.signature(fn)
    raw = inspect.signature(fn.__wrapped__)
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    # its own parameters first, unchanged (positional ones included), then the forwarded options
    own = [p for p in raw.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert list(sig.parameters.values())[: len(own)] == own
    for option in SDPA_KEYWORDS:
        if option.name in spec.refused:
            assert option.name not in sig.parameters
        else:
            p = sig.parameters[option.name]
            assert p.kind is KW and p.default == option.default
    # no option is taken positionally
    assert all(p.kind is KW for n, p in sig.parameters.items() if n in {o.name for o in SDPA_KEYWORDS})
    text = pydoc.render_doc(fn)
    assert "causal=False" in text and "empty_rows='zero'" in text
    for option in spec.forwarded:
        assert f"``{option.name}={option.default!r}``: {option.doc}" in fn.__doc__


@pytest.mark.parametrize(
    ("name", "option"), [(n, o) for n, (fn, _, _) in CASES.items() for o in fn.sdpa_options.refused]
)
def test_a_refused_option_is_refused_with_its_reason(name, option):
    fn = CASES[name][0]
    reason = fn.sdpa_options.refused[option]
    value = {"align": "bottom_right"}.get(option, next(o.default for o in SDPA_KEYWORDS if o.name == option))
    with pytest.raises(refattn.RefAttnError) as e:
        _call(name, **{option: value})
    assert str(e.value) == f"{name}: option {option!r} is not accepted: {reason}"
    assert f"``{option}``" in (fn.__wrapped__.__doc__ or "") or name == "assert_attention_close"  # stated in source
    assert f"* ``{option}``: {reason}" in fn.__doc__


REFUSED = {
    "multihead_attention": {"return_lse"},
    "multihead_attention_backward": {"return_lse"},
    "loops.multihead_attention": {"return_lse", "backend"},
    "loops.sdpa": {"backend"},
    "decode": {"align", "backend"},
    "decode_backward": {"align", "backend", "return_lse"},
    "check_attention": {"backend"},
    "assert_attention_close": {"backend"},
    "translate_options": {"return_lse", "backend"},
    "torch_sdpa": {"return_lse", "backend"},
    "check_torch": {"return_lse", "backend"},
}


@pytest.mark.parametrize("name", CASES)
def test_the_refused_options_are_the_documented_list(name):
    default = {"backend", "return_lse"} if name.endswith("_backward") else {"backend"}
    assert set(CASES[name][0].sdpa_options.refused) == REFUSED.get(name, default)


def _same(a, b):
    if isinstance(a, compare.Verdict):
        assert a.report() == b.report()
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif a is None or isinstance(a, (bool, float, int, str)):
        assert a == b
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", CASES)
def test_a_valid_call_is_the_undecorated_functions(name):
    if name in NEEDS_TORCH:
        pytest.importorskip("torch")
    fn, build, options = CASES[name]
    args, own = build(np.random.default_rng(0))
    got = fn(*args, **own, **options)
    _same(got, fn.__wrapped__(*args, **own, **options))
    if name in ("check_attention", "assert_attention_close"):
        assert got.passed


def test_options_are_not_taken_positionally():
    q, k, v = _qkv(np.random.default_rng(0))
    with pytest.raises(TypeError):
        tiled.sdpa_online(q, k, v, 2, 2)
    with pytest.raises(TypeError):
        loops.sdpa(q, k, v, None)
    with pytest.raises(TypeError):
        sparse.topk_mask(q, 2)


def test_return_lse_and_the_backend_where_a_variant_takes_them():
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng)
    out, lse = refattn.topk_attention(q, k, v, top_k=2, causal=True, return_lse=True)
    ref_out, ref_lse = refattn.topk_attention.__wrapped__(q, k, v, top_k=2, causal=True, return_lse=True)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(lse, ref_lse)
    x, params = _mha(rng)
    y = refattn.multihead_attention(x, params, num_heads=2, causal=True, backend="numpy")
    np.testing.assert_array_equal(y, multihead.multihead_attention.__wrapped__(x, params, num_heads=2, causal=True))
    # check_attention takes an sdpa call's options as they are: return_lse is ignored
    verdict = compare.check_attention(*_candidate(rng), dtype="float64", causal=True, return_lse=True)
    assert verdict.passed


def test_the_decorator_refuses_to_drift():
    with pytest.raises(TypeError, match="not sdpa options"):
        takes_sdpa_options(refuses={"casual": "no"})

    with pytest.raises(TypeError, match="causal defaults to True"):

        @takes_sdpa_options()
        def f(q, *, causal=True, **options):
            return q

    with pytest.raises(TypeError, match="no \\*\\*options"):

        @takes_sdpa_options()
        def g(q, *, causal=False):
            return q

    with pytest.raises(TypeError, match="takes as its own"):

        @takes_sdpa_options(refuses={"causal": "no"})
        def h(q, *, causal=False, **options):
            return q
