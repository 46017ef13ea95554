"""The Supervisor actor: state machine, admission, recovery, host lifecycle.

Parts: :mod:`._states` (state enums and the books' records), :mod:`._messages`,
:mod:`._admission` (who may enter; the queue), :mod:`._effects` (the one seam to the
world: actors, hosts, timers), :mod:`._base` (the books and their primitives),
:mod:`._recovery` and :mod:`._supervisor` (the decisions; the data-flow picture is at
the top of :mod:`._supervisor`), :mod:`._status` (the snapshot).
"""

from p11guard.supervisor._admission import AdmissionQueue, frame_share, refusal
from p11guard.supervisor._base import JobObserver
from p11guard.supervisor._effects import Effects
from p11guard.supervisor._messages import (
    AddCallback,
    AddObserver,
    Close,
    Finalize,
    InjectFault,
    MemberAttempt,
    RenewAttempt,
    StatusRequest,
    Submit,
    SupervisorTick,
)
from p11guard.supervisor._states import MemberState, SharedState, SlotState, State
from p11guard.supervisor._supervisor import Supervisor

__all__ = [
    "AddCallback",
    "AddObserver",
    "AdmissionQueue",
    "Close",
    "Effects",
    "Finalize",
    "InjectFault",
    "JobObserver",
    "MemberAttempt",
    "MemberState",
    "RenewAttempt",
    "SharedState",
    "SlotState",
    "State",
    "StatusRequest",
    "Submit",
    "Supervisor",
    "SupervisorTick",
    "frame_share",
    "refusal",
]
