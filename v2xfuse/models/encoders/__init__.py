"""Per-sensor BEV encoders and the sensor fuser; importing this package registers them in
``ENCODERS`` and ``SENSOR_FUSERS``."""
from . import camera_bev  # noqa: F401
from . import fuser  # noqa: F401
from . import lss  # noqa: F401
from . import pointpillars  # noqa: F401
from . import second  # noqa: F401,E402
