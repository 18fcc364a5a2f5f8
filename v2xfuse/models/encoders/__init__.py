"""Per-agent BEV encoders; importing this package registers them in ``ENCODERS``."""
from . import pointpillars  # noqa: F401
from . import second  # noqa: F401,E402
