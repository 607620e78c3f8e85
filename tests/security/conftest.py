"""Fixtures of the security suite: users with and without the reprocess permission."""

import pytest
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.factories import UserFactory


@pytest.fixture
def viewer(db):
    """A logged-in user without the reprocess permission."""
    return UserFactory()


@pytest.fixture
def operator_token(operator) -> str:
    return Token.objects.create(user=operator).key


@pytest.fixture
def operator_api(operator_token):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {operator_token}")
    return client


@pytest.fixture
def viewer_api(viewer):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=viewer).key}")
    return client


@pytest.fixture
def viewer_client(viewer):
    client = Client()
    client.force_login(viewer)
    return client


@pytest.fixture
def operator_client(operator):
    client = Client()
    client.force_login(operator)
    return client
