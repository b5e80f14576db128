"""The web page for people: enroll, search and see the attention masks in a browser (``/ui``)."""

from app.ui.page import CONTENT_SECURITY_POLICY, PAGE_PATH, install_ui, is_public_path

__all__ = ["CONTENT_SECURITY_POLICY", "PAGE_PATH", "install_ui", "is_public_path"]
