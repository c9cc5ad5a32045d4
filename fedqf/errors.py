"""The one exception tree of fedqf: every error a user can cause is a FedqfError."""

from __future__ import annotations


class FedqfError(Exception):
    """Root of fedqf's errors; the CLI turns one into a single line and exit code ``exit_code``."""

    exit_code: int = 1


class ConfigError(FedqfError):
    """A federation file, or an override of it, is malformed: unknown key, wrong type, out of range."""

    exit_code = 2


class DataError(FedqfError):
    """An institution's data is missing, unreadable, or does not match the expected schema."""

    exit_code = 2


class CryptoError(FedqfError):
    """A CKKS context or ciphertext is wrong: private context where a public one belongs, wrong key, overflow."""


class PrivacyBudgetExceededError(FedqfError):
    """Training further would spend more than the institution's privacy budget (epsilon at delta)."""


class UpdateRejectedError(FedqfError):
    """An institution's update cannot be aggregated: malformed, wrong key, non-finite, or the wrong shape."""


class FederationError(FedqfError):
    """The federation could not run to the end: too few institutions answered, or the runtime failed."""


class InstitutionsMissingError(FederationError):
    """Too few institutions stayed connected to start a round: the federation stops with its checkpoint kept, so
    that `--resume` continues it once they are back."""


class KeyMaterialError(FedqfError):
    """A key or certificate file is missing, unreadable, or of the wrong kind."""

    exit_code = 2
