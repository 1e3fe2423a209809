"""The model server: routes, admission, batching over compiled shapes, copies, metrics."""
