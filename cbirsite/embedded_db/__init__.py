"""A Django database backend for the embedded PostgreSQL (DATABASE_URL unset):
Django's own postgresql backend that starts (or re-attaches to) the server
under var/pg before its first connection in a process, so importing the
settings starts nothing; see cbirsite/embedded.py."""
