"""Router fixtures: prompts no other test sends (Redis comes from tests/conftest.py)."""
from tests.server.conftest import fresh_prompt  # noqa: F401
