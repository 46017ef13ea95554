"""p11guard: keep PKCS#11 crypto work alive through the loss of a whole HSM group."""

from p11guard._errors import *  # noqa: F403
from p11guard._errors import __all__ as _errors_all
from p11guard._secret import Secret

__all__ = [*_errors_all, "Secret"]
__version__ = "0.1.0"
