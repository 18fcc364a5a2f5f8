"""Which sensors each agent carries (``dataset.sensors``): heterogeneous collaboration as in
HEAL, e.g. a camera-only roadside unit helping LiDAR-only cars::

    dataset:
      sensors: {ego: [lidar], vehicle: [lidar], infrastructure: [camera]}

Keys are the agent's role in the sample, ``ego``, or its kind (``AgentObs.kind``: ``vehicle``,
``infrastructure``); values are lists of :data:`~v2xfuse.structures.coop.SENSORS` (``lidar``,
``camera``). The ego takes its ``ego`` entry, or its kind's when there is none; every other
agent its kind's; a kind not listed keeps every sensor. Unknown keys and sensors, and an empty
list (to leave roadside units out, use the adapter's own option, e.g. OPV2V's
``include_rsu``), are errors naming the key.

An agent loses the data of every sensor it does not carry when the adapter reads its frame,
before anything else sees it: its points become ``(0, 4)``, its cameras ``[]``, and so for its
older observations (``history``). The adapters do not even read those files (a LiDAR-only
car's images are never decoded, a camera-only unit's point cloud never parsed, so neither
needs to exist). Poses, timestamps, kinds and the ground truth are unchanged: the labels
describe the scene, not what one agent could sense.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..structures.coop import AGENT_KINDS, SENSORS, AgentObs

__all__ = ["AgentSensors", "ROLES"]

#: the keys of ``dataset.sensors``
ROLES = ("ego",) + AGENT_KINDS


@dataclass(frozen=True)
class AgentSensors:
    """``dataset.sensors`` parsed: role (:data:`ROLES`) -> the sensors agents in it carry.

    Attributes:
        carried: the roles the config names; the others carry every sensor.
    """

    carried: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, section: Mapping | None) -> "AgentSensors":
        """Parse and check a ``dataset.sensors`` mapping (None: every agent, every sensor)."""
        if section is None:
            return cls()
        if isinstance(section, AgentSensors):
            return section
        if not isinstance(section, Mapping):
            raise TypeError(f"dataset.sensors: expected a mapping of agent kind -> sensors, got "
                            f"{type(section).__name__}")
        carried = {}
        for key, sensors in section.items():
            if key not in ROLES:
                raise KeyError(f"dataset.sensors.{key}: unknown agent kind {key!r} (known: "
                               f"{', '.join(ROLES)})")
            if isinstance(sensors, str) or not isinstance(sensors, (list, tuple)):
                raise TypeError(f"dataset.sensors.{key}: expected a list of sensors "
                                f"({', '.join(SENSORS)}), got {sensors!r}")
            unknown = [s for s in sensors if s not in SENSORS]
            if unknown:
                raise KeyError(f"dataset.sensors.{key}: unknown sensor {unknown[0]!r} (known: "
                               f"{', '.join(SENSORS)})")
            if not sensors:
                raise ValueError(f"dataset.sensors.{key}: an agent needs at least one sensor (to "
                                 f"leave roadside units out use the dataset's own option, e.g. "
                                 f"include_rsu: false)")
            carried[key] = frozenset(sensors)
        return cls(carried)

    def of(self, kind: str, ego: bool) -> frozenset[str]:
        """The sensors an agent of ``kind`` carries (``ego``: it is the sample's ego)."""
        if ego and "ego" in self.carried:
            return self.carried["ego"]
        return self.carried.get(kind, frozenset(SENSORS))

    def drop_absent(self, agent: AgentObs, ego: bool) -> None:
        """Remove, in place, the data of the sensors ``agent`` does not carry, from its current
        observation and its history (a no-op when the adapter never read them)."""
        carried = self.of(agent.kind, ego)
        for obs in (agent, *agent.history):
            if "lidar" not in carried:
                obs.points = np.zeros((0, 4), np.float32)
            if "camera" not in carried:
                obs.cameras = []
