"""The staged compiler passes (captured -> annotated -> qdq -> folded -> fused -> lowered).

This folder sits at the top of the repository and is installed as `lowbit_compile.passes` (the
package-dir mapping in pyproject.toml), so it never takes the generic top-level name `passes`.
Import it as `lowbit_compile.passes`.
"""
