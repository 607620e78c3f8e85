import pytest
from django.test import Client

from tests.factories import UserFactory
from tests.reprocess.factories import grant_reprocess


@pytest.fixture
def operator(db):
    """A logged-in user allowed to reprocess."""
    user = UserFactory()
    grant_reprocess(user)
    return user


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
