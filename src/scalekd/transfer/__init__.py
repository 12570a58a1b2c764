"""Student weights for other toolkits."""
from .backbone_export import FORMATS, ExportFormatError, to_format

__all__ = ['FORMATS', 'ExportFormatError', 'to_format']
