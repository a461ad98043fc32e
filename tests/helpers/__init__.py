"""Helpers shared by the tests (images, requests, one-call clients); no tests live here."""
