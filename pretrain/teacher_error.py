"""The errors of a teacher that cannot be built from local files, or whose cached outputs do not fit the run."""


class TeacherError(ValueError):
    """A teacher that cannot be built from local files."""


class TeacherCacheError(ValueError):
    """A teacher cache that is missing, partial, or made by another teacher than the run's."""
