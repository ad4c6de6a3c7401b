"""The verdict of an adapter that runs a peer implementation itself (JAX, ONNX runtimes).

A peer may lack an option refattn has; running it anyway would judge something else, and raising
would stop a sweep over many configurations.  :class:`PeerVerdict` is a
:class:`refattn.testing.compare.Verdict` (the same judgements, the same report) that also carries
what could not be judged and why (``unsupported``) and what the reader must know to read the
numbers (``notes``: e.g. JAX computes its softmax in float32).  :func:`finish` applies the
adapters' ``raise_on=`` switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from refattn import lowp
from refattn._validate import RefAttnError, Unsupported, check_keywords_of
from refattn.testing.compare import AttentionMismatch, Verdict

__all__ = ["PeerVerdict", "RAISE_ON", "STATUSES", "finish", "rounded_inputs"]

#: The verdict statuses: every judgement passed; one failed; something asked for could not be judged.
STATUSES = ("pass", "FAIL", "unsupported")
#: What ``raise_on=`` may name: ``"unsupported"`` raises :class:`~refattn.Unsupported`, ``"mismatch"``
#: raises :class:`refattn.testing.AttentionMismatch`.
RAISE_ON = ("unsupported", "mismatch")


@dataclass
class PeerVerdict(Verdict):
    """A :class:`~refattn.testing.compare.Verdict` over what the peer computed, with the options it
    could not compute (``unsupported``, one reason each) and notes on how it was judged.

    ``status`` is ``"FAIL"`` when a judgement failed, else ``"unsupported"`` when something asked for
    could not be judged, else ``"pass"``; ``passed`` (and truthiness) is ``status == "pass"``: a
    verdict that judged nothing did not pass.
    """

    peer: str = ""
    unsupported: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def status(self):
        """``"pass"``, ``"FAIL"`` or ``"unsupported"`` (:data:`STATUSES`)."""
        if not all(j.passed for j in self.judgements):
            return "FAIL"
        return "unsupported" if self.unsupported or not self.judgements else "pass"

    @property
    def passed(self):
        return self.status == "pass"

    def report(self):
        """The headline (the peer and its status), the notes, the reasons of what is unsupported,
        then each judgement's lines (:meth:`refattn.testing.compare.Judgement.report`)."""
        head = {
            "pass": "refattn: candidate matches",
            "FAIL": "refattn: candidate does NOT match",
            "unsupported": "refattn: candidate NOT judged (unsupported)"
            if not self.judgements
            else "refattn: candidate partly judged (some of it unsupported)",
        }[self.status]
        lines = [f"{head}: {self.peer}" if self.peer else head]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"unsupported: {u}" for u in self.unsupported]
        return "\n".join(lines + [j.report() for j in self.judgements])


def finish(verdict, raise_on=()):
    """``verdict``, or the exception ``raise_on`` asks for.

    Parameters
    ----------
    verdict : PeerVerdict
        The adapter's verdict.
    raise_on : str or iterable of str, default ()
        Among :data:`RAISE_ON`: ``"unsupported"`` raises :class:`~refattn.Unsupported` (its message
        the reasons) when something could not be judged, ``"mismatch"`` raises
        :class:`refattn.testing.AttentionMismatch` (its message the report) when a judgement failed.
        Default (): raise nothing.

    Returns
    -------
    PeerVerdict
        ``verdict`` itself.

    Raises
    ------
    Unsupported, AttentionMismatch
        As ``raise_on`` asks; :class:`~refattn.RefAttnError` for a name not in :data:`RAISE_ON`.
    """
    wanted = (raise_on,) if isinstance(raise_on, str) else tuple(raise_on)
    unknown = [w for w in wanted if w not in RAISE_ON]
    if unknown:
        raise RefAttnError(f"raise_on: expected names among {RAISE_ON}, got {unknown}")
    if "mismatch" in wanted and verdict.status == "FAIL":
        raise AttentionMismatch(verdict)
    if "unsupported" in wanted and verdict.unsupported:
        raise Unsupported("; ".join(verdict.unsupported))
    return verdict


def rounded_inputs(q, k, v, options, dtype):
    """The float64 values a candidate's low-precision inputs hold: what the golden must be computed on.

    Parameters
    ----------
    q, k, v : array_like
        The inputs as float64 values, ``(..., Hq, Lq, D)``, ``(..., Hk, Lk, D)``, ``(..., Hk, Lk, Dv)``.
    options : dict
        sdpa options; a float ``bias`` among them is rounded too.
    dtype : str, dtype or Format
        The candidate's input format (:func:`refattn.lowp.round_to`).

    Returns
    -------
    tuple
        ``(q, k, v, options)``: the rounded arrays (float64) and a copy of ``options`` with the
        rounded bias.
    """
    opts = dict(options)
    if opts.get("bias") is not None:
        opts.update(lowp.round_arrays({"bias": opts["bias"]}, dtype))
    q, k, v = lowp.round_arrays({"q": q, "k": k, "v": v}, dtype).values()
    return q, k, v, opts


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
