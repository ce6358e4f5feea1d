"""HTTP/1.1 awareness: request policy, header rules and an h11 relay."""
