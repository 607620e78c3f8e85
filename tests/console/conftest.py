import pytest
from django.test import Client

from tests.factories import UserFactory


@pytest.fixture
def client(operator):
    client = Client()
    client.force_login(operator)
    return client


@pytest.fixture
def viewer_client(db):
    """A logged-in user without the reprocess permission."""
    client = Client()
    client.force_login(UserFactory())
    return client
