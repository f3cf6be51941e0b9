"""Authentication gateway: transparent OpenID Connect login in front of upstream applications."""

__version__ = "0.1.0"
