"""The Supervisor actor: state machine, admission, recovery, host lifecycle."""

from p11guard.supervisor._supervisor import (
    AddCallback,
    Close,
    Finalize,
    InjectFault,
    SharedState,
    State,
    StatusRequest,
    Submit,
    Supervisor,
    SupervisorTick,
)

__all__ = [
    "AddCallback",
    "Close",
    "Finalize",
    "InjectFault",
    "SharedState",
    "State",
    "StatusRequest",
    "Submit",
    "Supervisor",
    "SupervisorTick",
]
