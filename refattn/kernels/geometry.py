"""The scalars of an attention kernel call, by name: ``Geometry`` (integers and flags), ``Scaling``
(floats), ``Tile`` (the coordinates of one tile, inside the kernels), and their numba types.

The kernels take ``Geometry`` and ``Scaling`` as single NamedTuple arguments instead of loose
scalars, so no two of them can be swapped at a call site, and their compile signatures are built
from the fields below (names and annotated types), not from positions.  Lengths, heads and the GQA
group are read from the arrays' shapes inside the kernels (they cannot disagree with the data);
the block sizes are compile-time constants (``sdpa_kernels.BLOCK_Q``, ``BLOCK_K``).  This module
does not import numba.
"""

from typing import NamedTuple

__all__ = ["EMPTY_POLICY", "Geometry", "Scaling", "Tile", "numba_type"]

#: sdpa's ``empty_rows`` policies as the integers ``Geometry.empty_policy`` carries.
EMPTY_POLICY = {"zero": 0, "nan": 1, "uniform": 2}


class Geometry(NamedTuple):
    """Which scores exist and how empty rows are filled, for one sdpa call (``specs/kernels.md``,
    Parameters).  Built by :meth:`of`; every field a Python ``bool`` or ``int``, so its numba type is
    ``numba_type(Geometry, types)``.  The per-sequence lengths, starts and offsets are an array beside
    it (``seq (N, 4)``: q_length, k_start, k_length, offset); with ``j' = j − k_start`` and ``d = j' −
    (i + offset)`` the rules are those of :func:`refattn.masks.allowed_positions`.

    Fields
    ------
    causal : bool
        Key ``j`` is disallowed for row ``i`` when ``d > 0``.
    has_left, left : bool, int
        Whether the window has a left side, and it: ``d < −left`` disallowed (unless ``j' <
        sink_tokens``); any sign.
    has_right, right : bool, int
        Whether the window has a right side, and it: ``d > right`` disallowed; any sign.
    chunk : int
        ``c >= 1``: keys with ``(i + offset) // c != j' // c`` disallowed; 0: no chunks.
    sink_tokens : int
        Keys ``j' < sink_tokens`` are exempt from the window's left side.
    empty_policy : int
        Rows with every key disallowed and no finite sink: 0 ``"zero"``, 1 ``"nan"``, 2 ``"uniform"``
        (:data:`EMPTY_POLICY`); padded query rows (``i >= q_length``) are 0 under every policy.
    has_bias, has_mask, has_keep : bool
        Whether the kernel's ``bias``, ``mask`` and ``keep`` (dropout keep-scale) arrays are real,
        else 1-element placeholders that are never read.
    """

    causal: bool  # key j is disallowed for row i when d = j' - (i + offset) > 0
    has_left: bool  # whether the window has a left side
    left: int  # d < -left disallowed (unless j' < sink_tokens); any sign
    has_right: bool  # whether the window has a right side
    right: int  # d > right disallowed; any sign
    chunk: int  # c >= 1: (i + offset) // c != j' // c disallowed; 0: none
    sink_tokens: int  # keys j' < sink_tokens exempt from the left side
    empty_policy: int  # rows with every key disallowed: 0 zero, 1 nan, 2 uniform (EMPTY_POLICY)
    has_bias: bool  # whether the ``bias`` array is real (else a 1-element placeholder)
    has_mask: bool  # whether the ``mask`` array is real
    has_keep: bool  # whether the ``keep`` (dropout keep-scale) array is real

    @classmethod
    def of(cls, a):
        """The geometry of one sdpa call: the one place a Geometry is built.

        Parameters
        ----------
        a : refattn.attention.sdpa.Args
            Validated sdpa arguments (``refattn.attention.sdpa.validate``); its window sides arrive
            clipped (``refattn.masks.clip_window``), so the kernels' int64 index arithmetic cannot
            overflow.

        Returns
        -------
        Geometry
            Fields by keyword, as Python ``bool`` / ``int``; a None window side has ``has_* = False``.
        """
        left, right = a.window
        return cls(
            causal=bool(a.causal),
            has_left=left is not None,
            left=int(left or 0),
            has_right=right is not None,
            right=int(right or 0),
            chunk=int(a.chunk or 0),
            sink_tokens=int(a.sink_tokens),
            empty_policy=EMPTY_POLICY[a.empty_rows],
            has_bias=a.bias is not None,
            has_mask=a.user_mask is not None,
            has_keep=a.keep_scale is not None,
        )


class Scaling(NamedTuple):
    """The float options of the logits, for one sdpa call.  Built by :meth:`of`.

    Fields
    ------
    scale : float
        ``s0 = scale · q kᵀ``.
    softcap : float
        ``s = softcap · tanh(s0 / softcap)`` when ``> 0``; ``0``: no cap.
    """

    scale: float  # s0 = scale · q kᵀ
    softcap: float  # s = softcap · tanh(s0 / softcap) when > 0; 0: none

    @classmethod
    def of(cls, a):
        """The scaling of one sdpa call.

        Parameters
        ----------
        a : refattn.attention.sdpa.Args
            Validated sdpa arguments (``refattn.attention.sdpa.validate``).

        Returns
        -------
        Scaling
            ``scale`` as a Python float; ``softcap`` the cap, or ``0.0`` when there is none.
        """
        return cls(scale=float(a.scale), softcap=float(a.softcap or 0.0))


class Tile(NamedTuple):
    """One tile of the scores, built inside the kernels (by keyword) and passed to their helpers:
    the rows ``[i0, i0 + bq)`` and keys ``[j0, j0 + bk)`` of score batch element ``n``, head ``h``.

    Fields
    ------
    n : int
        Score batch element (flattened broadcast batch).
    h : int
        Query head.
    kvh : int
        Its key/value head, ``h // group`` (GQA).
    bn, mn, kn : int
        The bias, mask and keep batch elements that ``n`` reads (``maps[0 | 1 | 2, n]``).
    i0 : int
        First query row.
    bq : int
        Query rows (≤ ``BLOCK_Q``).
    j0 : int
        First key.
    bk : int
        Keys (≤ ``BLOCK_K``).
    """

    n: int  # score batch element
    h: int  # query head
    kvh: int  # its key/value head (h // group)
    bn: int  # the bias batch element that n reads (maps[0, n])
    mn: int  # the mask batch element (maps[1, n])
    kn: int  # the keep batch element (maps[2, n])
    i0: int  # first query row
    bq: int  # query rows (≤ BLOCK_Q)
    j0: int  # first key
    bk: int  # keys (≤ BLOCK_K)


_SCALARS = {bool: "boolean", int: "int64", float: "float64"}  # annotation -> numba type name


def numba_type(cls, types):
    """The numba type of instances of a NamedTuple, from its fields' annotations.

    ``bool`` → boolean, ``int`` → int64, ``float`` → float64: what ``numba.typeof`` gives an instance
    whose fields are Python bool / int / float, so an explicit signature built with it matches the
    call (and numba's on-disk cache can hold it).

    Parameters
    ----------
    cls : type
        A NamedTuple class whose fields are all annotated ``bool``, ``int`` or ``float``
        (:class:`Geometry`, :class:`Scaling`, :class:`Tile`); another annotation is a KeyError.
    types : module
        ``numba.types`` (passed in: this module does not import numba).

    Returns
    -------
    numba.types.NamedUniTuple or numba.types.NamedTuple
        The NamedTuple type of ``cls`` with those field types.
    """
    fields = [getattr(types, _SCALARS[cls.__annotations__[name]]) for name in cls._fields]
    return types.BaseTuple.from_types(fields, cls)
