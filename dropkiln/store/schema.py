"""The tables. Events are the truth; jobs, drops and artifacts are projections of them.

SQLAlchemy generates the DDL from these (``migrate``) for the backend's dialect; the queries
themselves are SQL text (``eventstore``, ``queries``, ``projections``), so that readers never
import SQLAlchemy. A column declared ``JSON`` comes back decoded on read connections.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    literal,
)

from dropkiln.store.eventstore import HIGH_RATE_TYPE

# 64-bit on PostgreSQL (byte counts in telemetry and artifacts pass 2**31); plain INTEGER on
# SQLite, whose integers are 64-bit anyway and whose autoincrement keys must say INTEGER.
Int = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

events = Table(
    "events",
    metadata,
    Column("seq", Int, primary_key=True, autoincrement=True),
    Column("stream", String, nullable=False),
    Column("version", Int, nullable=False),
    Column("type", String, nullable=False),
    Column("data", JSON, nullable=False),
    Column("at", String, nullable=False),
    UniqueConstraint("stream", "version", name="uq_events_stream_version"),
)
# Progress is most of the log and is never looked up by type; leaving it out of this
# index keeps the hottest append cheap. Queries by other types say the same condition
# (HIGH_RATE_TYPE) so that SQLite may use the index instead of scanning the log.
events_by_type = Index(
    "ix_events_type",
    events.c.type,
    events.c.seq,
    sqlite_where=events.c.type != literal(HIGH_RATE_TYPE),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String, primary_key=True),
    Column("stage", String, nullable=False),
    Column("name", String, nullable=False),
    Column("drop_id", String),
    Column("lane", String, nullable=False),
    Column("priority", Int, nullable=False),
    Column("depends_on", JSON, nullable=False),
    Column("spec", JSON, nullable=False),
    Column("rung_key", String),
    Column("state", String, nullable=False),
    Column("attempt", Int, nullable=False),
    Column("memory_rung", Int, nullable=False),
    Column("done", Int, nullable=False),
    Column("total", Int, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("checkpoint", JSON),
    Column("result", JSON),
    Column("error", Text),
    Column("requested", String),
    Column("executor", String),
    Column("device_class", String),
    Column("submitted_seq", Int, nullable=False),
    Column("version", Int, nullable=False),
    Column("created_at", String, nullable=False),
    Column("started_at", String),
    Column("finished_at", String),
    Column("updated_at", String, nullable=False),
)
Index("ix_jobs_state", jobs.c.state, jobs.c.priority, jobs.c.submitted_seq)
jobs_by_submission = Index("ix_jobs_submitted", jobs.c.submitted_seq)

drops = Table(
    "drops",
    metadata,
    Column("id", String, primary_key=True),
    Column("kind", String, nullable=False),
    Column("name", String, nullable=False),
    Column("source", String, nullable=False),
    Column("stored", String),
    Column("hash", String),
    Column("state", String, nullable=False),
    Column("reason", Text),
    Column("duplicate_of", String),
    Column("at", String, nullable=False),
)
Index("ix_drops_hash", drops.c.hash)

artifacts = Table(
    "artifacts",
    metadata,
    Column("job_id", String, primary_key=True),
    Column("path", String, primary_key=True),
    Column("seq", Int, nullable=False),
    Column("kind", String, nullable=False),
    Column("bytes", Int),
    Column("sha256", String),
    Column("at", String, nullable=False),
)

telemetry = Table(
    "telemetry",
    metadata,
    Column("id", Int, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("device", String, nullable=False),
    Column("allocated", Int),
    Column("reserved", Int),
    Column("peak", Int),
    Column("free", Int),
    Column("total", Int),
    Column("rss", Int),
    Column("job_id", String),
    Column("memory_rung", Int),
    Column("executor", String),
    Column("device_class", String),
)
Index("ix_telemetry_at", telemetry.c.at)

# Who holds each job's current attempt and until when. Not a projection: heartbeats move
# ``lease_until`` many times an attempt without an event (JobClaimed records the claim);
# the rows of jobs that are not running mean nothing. See ``leases``.
leases = Table(
    "leases",
    metadata,
    Column("job_id", String, primary_key=True),
    Column("executor", String, nullable=False),
    Column("attempt", Int, nullable=False),
    Column("lease_until", Float, nullable=False),
)

meta = Table(
    "meta",
    metadata,
    Column("key", String, primary_key=True),
    Column("value", String, nullable=False),
)

PROJECTIONS = (jobs, drops, artifacts)
