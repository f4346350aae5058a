"""SQLAlchemy tables, engines and sessions. Never imports torch."""
