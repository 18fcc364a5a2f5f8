"""Messages as bytes: the wire format, payload codecs and a simulated V2X channel."""
from .channel import Channel, Ledger, LinkConfig, TxRecord, perturb_pose
from .codecs import (CODECS, CellsCodec, Codec, CodesCodec, Float16Codec, Float32Codec, Int8Codec,
                     MaskCodec, RawCodec, SparseCodec, make_codec, pack_bits, unpack_bits)
from .message import (HEADER_BYTES, Message, MessageError, as_numpy, decode, encode,
                      overhead_bytes)

__all__ = ["Message", "MessageError", "as_numpy", "decode", "encode", "overhead_bytes",
           "HEADER_BYTES", "Codec", "RawCodec", "Float32Codec", "Float16Codec", "Int8Codec",
           "MaskCodec", "CodesCodec", "SparseCodec", "CellsCodec", "make_codec", "pack_bits",
           "unpack_bits", "CODECS", "Channel", "Ledger", "LinkConfig", "TxRecord", "perturb_pose"]
