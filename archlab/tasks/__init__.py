"""Understanding tasks (issue 17): labelled data in the field's formats and the field's metrics.

``data.py`` reads sentence classification (text/label CSV or JSON lines), token tagging
(CoNLL columns) and extractive QA (SQuAD JSON), refusing bad labels, misaligned tag lines and
answers outside their context in one line each; ``metrics.py`` scores them as the field does.
"""
