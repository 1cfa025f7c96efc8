"""ORM models. Importing this package registers every table on ``Base.metadata``."""

from app.models.audit import AuditEvent, AuditHead
from app.models.identity import ApiToken, IdempotencyKey, Membership, Org, Role, User
from app.models.jobs import Job, JobStatus
from app.models.resources import Agent, McpServer, Provider
from app.models.secrets import Secret

__all__ = [
    "Agent",
    "ApiToken",
    "AuditEvent",
    "AuditHead",
    "IdempotencyKey",
    "Job",
    "JobStatus",
    "McpServer",
    "Membership",
    "Org",
    "Provider",
    "Role",
    "Secret",
    "User",
]
