"""The node: one running backer, hosting folders, their meshes, watchers and event stream."""
