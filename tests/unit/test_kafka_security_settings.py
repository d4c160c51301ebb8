"""KafkaSecurity: one security setting rendered for faust, aiokafka and kafka-python; the
password never shown; inconsistent combinations refused with every reason."""

from __future__ import annotations

import ssl

import pytest
import trustme

from service.settings import Settings, SettingsError
from service.streaming.security import MECHANISMS, PLAINTEXT, KafkaSecurity


@pytest.fixture(scope="module")
def cafile(tmp_path_factory):
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def test_plaintext_renders_no_security_arguments():
    assert PLAINTEXT.aiokafka() == {"security_protocol": "PLAINTEXT"}
    assert PLAINTEXT.kafka_python() == {"security_protocol": "PLAINTEXT"}
    assert PLAINTEXT.faust_credentials() is None and PLAINTEXT.ssl_context() is None


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_sasl_ssl_reaches_every_client_library_alike(mechanism, cafile):
    from faust import SASLCredentials
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    sec = KafkaSecurity("SASL_SSL", mechanism, "svc", "pw", ssl_cafile=cafile)
    aio = sec.aiokafka()
    assert aio["security_protocol"] == "SASL_SSL" and aio["sasl_mechanism"] == mechanism
    assert (aio["sasl_plain_username"], aio["sasl_plain_password"]) == ("svc", "pw")
    assert isinstance(aio["ssl_context"], ssl.SSLContext)
    assert aio["ssl_context"].verify_mode == ssl.CERT_REQUIRED and aio["ssl_context"].check_hostname
    kp = sec.kafka_python()
    assert kp == {"security_protocol": "SASL_SSL", "ssl_check_hostname": True,
                  "ssl_cafile": cafile, "ssl_certfile": None, "ssl_keyfile": None,
                  "sasl_mechanism": mechanism, "sasl_plain_username": "svc",
                  "sasl_plain_password": "pw"}
    cred = sec.faust_credentials()
    assert isinstance(cred, SASLCredentials)
    # what faust hands to its aiokafka consumer and producer
    fa = credentials_to_aiokafka_auth(cred)
    assert fa["security_protocol"] == "SASL_SSL" and fa["sasl_mechanism"] == mechanism
    assert fa["sasl_plain_username"] == "svc" and fa["sasl_plain_password"] == "pw"
    assert isinstance(fa["ssl_context"], ssl.SSLContext)


def test_sasl_plaintext_and_ssl_alone(cafile):
    from faust import SSLCredentials
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    sp = KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-256", "u", "p")
    assert "ssl_context" not in sp.aiokafka() and "ssl_cafile" not in sp.kafka_python()
    assert credentials_to_aiokafka_auth(sp.faust_credentials())["security_protocol"] == \
        "SASL_PLAINTEXT"
    tls = KafkaSecurity("SSL", ssl_cafile=cafile, ssl_check_hostname=False)
    assert "sasl_mechanism" not in tls.aiokafka() and "sasl_mechanism" not in tls.kafka_python()
    assert tls.aiokafka()["ssl_context"].check_hostname is False
    assert isinstance(tls.faust_credentials(), SSLCredentials)
    assert credentials_to_aiokafka_auth(tls.faust_credentials())["security_protocol"] == "SSL"


def test_the_password_is_never_shown():
    sec = KafkaSecurity("SASL_SSL", "PLAIN", "svc", "hunter2")
    assert "hunter2" not in repr(sec) and "hunter2" not in sec.describe()
    s = Settings.from_env({"PAIRSIEVE_KAFKA_BOOTSTRAP": "k:9092",
                           "PAIRSIEVE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                           "PAIRSIEVE_KAFKA_SASL_MECHANISM": "PLAIN",
                           "PAIRSIEVE_KAFKA_SASL_USERNAME": "svc",
                           "PAIRSIEVE_KAFKA_SASL_PASSWORD": "hunter2"})
    assert "hunter2" not in repr(s)
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"PAIRSIEVE_KAFKA_BOOTSTRAP": "k:9092",
                           "PAIRSIEVE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                           "PAIRSIEVE_KAFKA_SASL_MECHANISM": "GSSAPI",
                           "PAIRSIEVE_KAFKA_SASL_PASSWORD": "hunter2"})
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("kw, expected", [
    (dict(protocol="TLS"), "expected one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
    (dict(protocol="SASL_SSL", sasl_mechanism="GSSAPI", username="u", password="p"),
     "SASL mechanism 'GSSAPI'"),
    (dict(protocol="SASL_SSL", sasl_mechanism="PLAIN", username="u"),
     "needs a SASL user name and password (got a user name and no password)"),
    (dict(protocol="PLAINTEXT", username="u"), "used only with SASL_PLAINTEXT or SASL_SSL"),
    (dict(protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", username="u", password="p",
          ssl_cafile="ca.pem"), "TLS files set with protocol SASL_PLAINTEXT"),
    (dict(protocol="SSL", ssl_certfile="c.pem"), "mutual TLS needs both"),
])
def test_inconsistent_security_is_refused_with_its_reason(kw, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        KafkaSecurity(**kw)


def test_settings_name_the_variables_and_refuse_security_on_the_embedded_broker():
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"PAIRSIEVE_KAFKA_SECURITY_PROTOCOL": "SASL_TLS"})
    assert "PAIRSIEVE_KAFKA_SECURITY_PROTOCOL (--kafka-security-protocol) = 'SASL_TLS'" in \
        str(err.value)
    with pytest.raises(SettingsError, match="embedded broker is plaintext"):
        Settings.from_env({"PAIRSIEVE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                           "PAIRSIEVE_KAFKA_SASL_MECHANISM": "PLAIN",
                           "PAIRSIEVE_KAFKA_SASL_USERNAME": "u",
                           "PAIRSIEVE_KAFKA_SASL_PASSWORD": "p"})
    s = Settings.from_env({"PAIRSIEVE_KAFKA_BOOTSTRAP": "k:9092",
                           "PAIRSIEVE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                           "PAIRSIEVE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                           "PAIRSIEVE_KAFKA_SASL_USERNAME": "u",
                           "PAIRSIEVE_KAFKA_SASL_PASSWORD": "p"})
    assert s.kafka_security() == KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512", "u", "p")
    assert Settings.from_env({}).kafka_security() == PLAINTEXT
