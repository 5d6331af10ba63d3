"""The caller's SSH public keys (`/api/v1/ssh-keys/`), which go into the sandbox of every
order they place; checked as ssh-keygen reads them (marketplace.ssh_keys)."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from marketplace.api.schema import error_responses
from marketplace.api.serializers import SshKeyCreateSerializer, SshKeySerializer
from marketplace.models import SshKey
from marketplace.ssh_keys import add_ssh_key, delete_ssh_key


class SshKeyViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """The caller's SSH public keys, which go into the sandbox of every order they place.
    Another user's key is a 404."""

    queryset = SshKey.objects.none()  # for the schema generator; see get_queryset
    serializer_class = SshKeySerializer
    http_method_names = ["get", "post", "delete", "head", "options"]

    def get_queryset(self):
        return SshKey.objects.filter(user=self.request.user)

    @extend_schema(summary="Your SSH public keys")
    def list(self, request: Request, *args, **kwargs) -> Response:
        return super().list(request, *args, **kwargs)

    @extend_schema(
        request=SshKeyCreateSerializer,
        responses={
            201: SshKeySerializer,
            **error_responses(
                {
                    400: "naming the field: not a public key ssh-keygen accepts, a private key, "
                    "options or a forced command, several keys, a duplicate, more than "
                    f"{SshKey.MAX_PER_USER} keys, or a name too long",
                }
            ),
        },
        summary="Add an SSH public key to your account (used by the orders you place next)",
    )
    def create(self, request: Request) -> Response:
        form = SshKeyCreateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        key = add_ssh_key(
            request.user,
            public_key=form.validated_data["public_key"],
            name=form.validated_data.get("name", ""),
        )
        return Response(SshKeySerializer(key).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        responses={204: None, **error_responses({404: "no such key of yours"})},
        summary="Delete one of your SSH keys (placed orders keep the keys they were placed with)",
    )
    def destroy(self, request: Request, pk: str | None = None) -> Response:
        key = self.get_object()
        delete_ssh_key(request.user, key.pk)
        return Response(status=status.HTTP_204_NO_CONTENT)
