"""ORM models. Importing this package registers every table on ``Base.metadata``."""

from app.models.audit import AuditEvent, AuditHead
from app.models.backfill import BackfillVerification
from app.models.identity import ApiToken, IdempotencyKey, Membership, Org, Role, User
from app.models.jobs import Job, JobStatus
from app.models.resources import Agent, AgentRun, AgentTool, McpServer, McpTool, Provider
from app.models.secrets import CacheInvalidation, Secret

__all__ = [
    "Agent",
    "AgentRun",
    "AgentTool",
    "ApiToken",
    "AuditEvent",
    "AuditHead",
    "BackfillVerification",
    "CacheInvalidation",
    "IdempotencyKey",
    "Job",
    "JobStatus",
    "McpServer",
    "McpTool",
    "Membership",
    "Org",
    "Provider",
    "Role",
    "Secret",
    "User",
]
