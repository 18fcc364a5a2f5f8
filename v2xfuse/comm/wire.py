"""How one kind of message goes on the wire: the codec of each payload array and the receiver's
own check. A fusion method hands the channel one :class:`WireFormat` per round
(``FusionMethod.wire(kind)``); the channel never sees the method itself."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from .codecs import Codec, make_codec

__all__ = ["WireFormat", "PayloadCheck"]

#: ``check(kind, payload, state, sample, checked_finite) -> payload``: the receiver's checks of a
#: decoded payload (raise :class:`~v2xfuse.comm.checks.Rejected`), possibly sanitising it.
PayloadCheck = Callable[..., dict]


@dataclass(frozen=True)
class WireFormat:
    """What the channel needs to put one kind of message on the wire and take it off.

    Attributes:
        method: label of the bytes in ``Ledger.per_method()``.
        kind: the messages' kind (``"features"``, ``"report"``...).
        codecs: payload array name -> codec name (:mod:`v2xfuse.comm.codecs`). An array the
            sender puts in a payload without a codec here is an error: nothing goes out in a
            format nobody chose.
        codec_kwargs: payload array name -> keyword arguments of its codec, over the channel's
            per-codec defaults (e.g. ``{"codes": {"bits": 6}}``).
        check: the receiver's check of what arrived (:data:`PayloadCheck`), or None.
    """

    method: str
    kind: str
    codecs: Mapping[str, str]
    codec_kwargs: Mapping[str, Mapping] = field(default_factory=dict)
    check: PayloadCheck | None = None

    def codec(self, name: str, defaults: Mapping[str, Mapping] | None = None) -> Codec:
        """The codec of payload array ``name`` (``defaults``: codec name -> keyword arguments)."""
        if name not in self.codecs:
            raise ValueError(f"{self.method}: payload array {name!r} of a {self.kind!r} message "
                             f"has no codec (codecs: {sorted(self.codecs)})")
        codec_name = self.codecs[name]
        kwargs = {**(defaults or {}).get(codec_name, {}), **self.codec_kwargs.get(name, {})}
        return make_codec(codec_name, name, **kwargs)
