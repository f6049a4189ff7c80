from orthanc_plugin.core.uids import derived_uid, fingerprint, job_id, job_key, output_uids


def test_fingerprint_ignores_order_and_duplicates():
    assert fingerprint(["b", "a", "a"]) == fingerprint(["a", "b"])
    assert fingerprint(["a", "b"]) != fingerprint(["a", "c"])


def test_output_uids_are_a_function_of_the_key():
    k = job_key("1.2.3", "ct-lung", "1.0.0", fingerprint(["x"]))
    a, b = output_uids(k), output_uids(k)
    assert a == b
    assert len({a.seg_series, a.seg_instance, a.sr_series, a.sr_instance}) == 4
    other = output_uids(job_key("1.2.3", "ct-lung", "1.0.1", fingerprint(["x"])))
    assert other.seg_instance != a.seg_instance
    assert a.seg_instance.startswith("2.25.") and len(a.seg_instance) <= 64
    assert "1.2.3" not in a.key  # the key handed on is hashed


def test_job_id_stable_and_short():
    k = job_key("1.2.3", "p", "1", "f")
    assert job_id(k) == job_id(k) and len(job_id(k)) == 20
    assert derived_uid(k, "a") != derived_uid(k, "b")
