"""Stand-in for transformers' `utils/fetch_hub_objects_for_ci.py` (a repository script, not in the sdist).

It maps the Hub URLs of image/video/audio fixtures to files pre-downloaded in transformers' CI. ProtLLM has no such
modality and the tests run offline: the URL is returned unchanged, and the processor tests that would open it are
the image/video/audio ones, skipped for a protein processor.
"""


def url_to_local_path(url, return_url_if_not_found=True):
    return url
