"""The Django admin, where a periodic task's headers (and so its jitter) are edited."""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]
