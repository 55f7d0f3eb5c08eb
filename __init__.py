"""ComfyUI entry point of the oboro extension (V3 schema).

The node modules import ComfyUI, so they load lazily here: importing this package alone (tests,
training scripts) pulls in only the pure-PyTorch core.
"""

WEB_DIRECTORY = "./web"  # node help pages (web/docs/<Node>.md, <Node>/ja.md); translations: locales/


async def comfy_entrypoint():
    from .nodes import OboroExtension
    return OboroExtension()
