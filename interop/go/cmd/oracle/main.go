// Command oracle writes crates/eventbus-core/tests/fixtures/go_envelopes.json: what the Go
// SDK's own envelope code (github.com/ChenBigdata421/jxt-core v1.7.5, sdk/pkg/eventbus:
// NewEnvelope, Envelope.ToBytes, FromBytes) produces for a set of values and accepts for a set of
// inputs. The Rust tests compare eventbus-core against it byte for byte, and the integration
// test `go_sdk` (run by `cargo xtask test-matrix`) builds this against the SDK and fails if the
// committed fixtures differ.
//
// Regenerate (after the test built it into target/go/oracle):
//
//	target/go/oracle > crates/eventbus-core/tests/fixtures/go_envelopes.json
package main

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/ChenBigdata421/jxt-core/sdk/pkg/eventbus"
)

// An encode case: values both sides build an envelope from.
type encodeCase struct {
	Name          string `json:"name"`
	EventID       string `json:"event_id"`
	AggregateID   string `json:"aggregate_id"`
	EventType     string `json:"event_type"`
	EventVersion  int64  `json:"event_version"`
	Timestamp     string `json:"timestamp"`
	TraceID       string `json:"trace_id"`
	CorrelationID string `json:"correlation_id"`
	TenantID      int    `json:"tenant_id"`
	PayloadHex    string `json:"payload_hex"`
	GoHex         string `json:"go_hex"`
}

// A decode case: raw bytes, whether the Go SDK accepts them, and its re-encoding.
type decodeCase struct {
	Name        string `json:"name"`
	InputHex    string `json:"input_hex"`
	Accepted    bool   `json:"accepted"`
	GoError     string `json:"go_error,omitempty"`
	ReencodeHex string `json:"reencode_hex,omitempty"`
}

func enc(name, id, agg, typ string, ver int64, ts, trace, corr string, tenant int, payload string) encodeCase {
	return encodeCase{name, id, agg, typ, ver, ts, trace, corr, tenant, hex.EncodeToString([]byte(payload)), ""}
}

const base = `"event_id":"e-1","aggregate_id":"order-1","event_type":"OrderPlaced","event_version":1`

func main() {
	encodes := []encodeCase{
		enc("minimal", "e-1", "order-1", "OrderPlaced", 1, "2024-05-06T07:08:09Z", "", "", 0, `{}`),
		enc("all_fields", "0190a6f0-7c3e-7d2a-9b1e-1234567890ab", "tenant:7/order-42", "order.placed.v2", 42, "2024-05-06T07:08:09.123456789+08:00", "trace-abc", "corr-xyz", 7, `{"total":12.5,"items":[1,2,3]}`),
		enc("html_chars_in_strings", "e<1>", "order-1", "A&B<C>", 1, "2024-05-06T07:08:09Z", "<script>", "a&b", 0, `{}`),
		enc("control_chars", "e\n1\t\r", "order-1", "T\u0001\u0008\u000c\u001f\u007f", 1, "2024-05-06T07:08:09Z", "", "", 0, `{}`),
		enc("quotes_and_backslashes", `e"1\`, "order-1", `T\"x`, 1, "2024-05-06T07:08:09Z", "", "", 0, `{}`),
		enc("unicode", "événement-1", "order-1", "注文作成", 1, "2024-05-06T07:08:09Z", "😀", "line\u2028sep\u2029", 0, `{}`),
		enc("negative_tenant", "e-1", "order-1", "T", 1, "2024-05-06T07:08:09Z", "", "", -3, `{}`),
		enc("max_version", "e-1", "order-1", "T", 9223372036854775807, "2024-05-06T07:08:09Z", "", "", 0, `{}`),
		enc("nanos_trimmed", "e-1", "order-1", "T", 1, "2024-05-06T07:08:09.120000000Z", "", "", 0, `{}`),
		enc("one_nano", "e-1", "order-1", "T", 1, "2024-05-06T07:08:09.000000001-05:30", "", "", 0, `{}`),
		enc("zero_time", "e-1", "order-1", "T", 1, "0001-01-01T00:00:00Z", "", "", 0, `{}`),
		enc("year_zero", "e-1", "order-1", "T", 1, "0000-01-01T00:00:00Z", "", "", 0, `{}`),
		enc("payload_verbatim_whitespace", "e-1", "order-1", "T", 1, "2024-05-06T07:08:09Z", "", "", 0, " {\n  \"a\" : [1, 2]\n} "),
		enc("payload_with_html_unescaped", "e-1", "order-1", "T", 1, "2024-05-06T07:08:09Z", "", "", 0, `{"html":"<b>&amp;</b>"}`),
		enc("payload_string", "e-1", "order-1", "T", 1, "2024-05-06T07:08:09Z", "", "", 0, `"just a string"`),
		enc("payload_number", "e-1", "order-1", "T", 1, "2024-05-06T07:08:09Z", "", "", 0, `1.5e10`),
		enc("payload_array", "e-1", "order-1", "T", 1, "2024-05-06T07:08:09Z", "", "", 0, `[true,false,null]`),
		enc("payload_escapes_kept", "e-1", "order-1", "T", 1, "2024-05-06T07:08:09Z", "", "", 0, `{"s":"\u00e9\n\/"}`),
		enc("aggregate_with_spaces_kept", "e-1", "  order-1  ", "T", 1, "2024-05-06T07:08:09Z", "", "", 0, `{}`),
		enc("long_aggregate", "e-1", strings.Repeat("a", 256), "T", 1, "2024-05-06T07:08:09Z", "", "", 0, `{}`),
	}
	for i := range encodes {
		c := &encodes[i]
		ts, err := time.Parse(time.RFC3339Nano, c.Timestamp)
		if err != nil {
			panic(err)
		}
		payload, _ := hex.DecodeString(c.PayloadHex)
		e := eventbus.NewEnvelope(c.EventID, c.AggregateID, c.EventType, c.EventVersion, payload)
		e.Timestamp = ts
		e.TraceID = c.TraceID
		e.CorrelationID = c.CorrelationID
		e.TenantID = c.TenantID
		out, err := e.ToBytes()
		if err != nil {
			panic(fmt.Sprintf("%s: %v", c.Name, err))
		}
		c.GoHex = hex.EncodeToString(out)
	}

	inputs := []struct{ name, input string }{
		{"go_service_envelope", `{"event_id":"0190a6f0-7c3e-7d2a-9b1e-1234567890ab","aggregate_id":"order-42","event_type":"OrderPlaced","event_version":3,"timestamp":"2024-05-06T07:08:09.123456789+08:00","trace_id":"t-1","tenant_id":5,"payload":{"total":12.5}}`},
		{"whitespace_everywhere", " \n{ \"event_id\" : \"e-1\" ,\t\"aggregate_id\":\"order-1\",\r\n\"event_type\":\"T\",\"event_version\":1,\"payload\": [ 1 , 2 ] } \n"},
		{"unknown_fields_ignored", `{` + base + `,"extra":{"deep":[1,{"x":null}]},"other":"y","payload":{}}`},
		{"uppercase_names", `{"EVENT_ID":"e-1","Aggregate_Id":"order-1","EVENT_TYPE":"T","Event_Version":2,"PAYLOAD":{}}`},
		{"long_s_folds_in_name", `{` + base + `,"timeſtamp":"2024-01-01T00:00:00Z","payload":{}}`},
		{"dotted_capital_i_folds_in_name", `{"event_İd":"e-1","aggregate_id":"order-1","event_type":"T","event_version":1,"payload":{}}`},
		{"case_variant_duplicate_last_wins", `{"event_id":"e-1","EVENT_ID":"e-2","aggregate_id":"order-1","event_type":"T","event_version":1,"payload":{}}`},
		{"name_with_hyphen_is_unknown", `{"event-id":"e-1","aggregate_id":"order-1","event_type":"T","event_version":1,"payload":{}}`},
		{"duplicate_field_last_wins", `{` + base + `,"event_type":"Second","payload":{"a":1},"payload":{"b":2}}`},
		{"null_after_string_empties_it", `{` + base + `,"trace_id":"t","trace_id":null,"payload":{}}`},
		{"null_after_tenant_keeps_it", `{` + base + `,"tenant_id":5,"tenant_id":null,"payload":{}}`},
		{"null_after_timestamp_keeps_it", `{` + base + `,"timestamp":"2024-01-01T00:00:00Z","timestamp":null,"payload":{}}`},
		{"null_after_version_keeps_it", `{` + base + `,"event_version":null,"payload":{}}`},
		{"null_after_event_id_empties_it", `{` + base + `,"event_id":null,"payload":{}}`},
		{"null_after_payload_empties_it", `{` + base + `,"payload":{},"payload":null}`},
		{"null_optional_fields", `{` + base + `,"trace_id":null,"correlation_id":null,"tenant_id":null,"timestamp":null,"payload":{}}`},
		{"missing_timestamp", `{` + base + `,"payload":{}}`},
		{"escaped_key", `{"event\u005fid":"e-1","aggregate_id":"order-1","event_type":"T","event_version":1,"payload":{}}`},
		{"escaped_values", `{"event_id":"e\u002d1\n","aggregate_id":"order\/1","event_type":"\u00e9\ud83d\ude00","event_version":1,"payload":{}}`},
		{"lone_surrogate_in_string", `{"event_id":"e\ud800x","aggregate_id":"order-1","event_type":"T","event_version":1,"payload":{}}`},
		{"invalid_utf8_in_string", "{\"event_id\":\"e\xff\xfe1\",\"aggregate_id\":\"order-1\",\"event_type\":\"T\",\"event_version\":1,\"payload\":{}}"},
		{"invalid_utf8_in_payload", "{" + base + ",\"payload\":\"\xff\"}"},
		{"html_in_values", `{"event_id":"<e>","aggregate_id":"order-1","event_type":"a&b","event_version":1,"payload":{"x":"<>"}}`},
		{"timestamp_offset_kept", `{` + base + `,"timestamp":"2024-01-01T00:00:00.5-03:30","payload":{}}`},
		{"timestamp_many_fraction_digits", `{` + base + `,"timestamp":"2024-01-01T00:00:00.1234567891234Z","payload":{}}`},
		{"timestamp_minus_zero_offset", `{` + base + `,"timestamp":"2024-01-01T00:00:00-00:00","payload":{}}`},
		{"negative_zero_version_rejected", `{"event_id":"e-1","aggregate_id":"order-1","event_type":"T","event_version":-0,"payload":{}}`},
		{"aggregate_padded", `{"event_id":"e-1","aggregate_id":"  order-1 ","event_type":"T","event_version":1,"payload":{}}`},
		{"payload_verbatim", `{` + base + `,"payload":  {"b" : 1 ,"a":[ ]}  }`},
		{"payload_scalar", `{` + base + `,"payload":42}`},
		{"payload_string", `{` + base + `,"payload":"text"}`},
		{"top_level_null", `null`},
		{"top_level_array", `[]`},
		{"top_level_string", `"x"`},
		{"empty_input", ``},
		{"empty_object", `{}`},
		{"trailing_garbage", `{` + base + `,"payload":{}} x`},
		{"trailing_comma", `{` + base + `,"payload":{},}`},
		{"truncated", `{` + base + `,"payload":{`},
		{"missing_event_id", `{"aggregate_id":"order-1","event_type":"T","event_version":1,"payload":{}}`},
		{"blank_event_id", `{"event_id":" \t","aggregate_id":"order-1","event_type":"T","event_version":1,"payload":{}}`},
		{"missing_aggregate", `{"event_id":"e-1","event_type":"T","event_version":1,"payload":{}}`},
		{"invalid_aggregate_char", `{"event_id":"e-1","aggregate_id":"order#1","event_type":"T","event_version":1,"payload":{}}`},
		{"aggregate_too_long", `{"event_id":"e-1","aggregate_id":"` + strings.Repeat("a", 257) + `","event_type":"T","event_version":1,"payload":{}}`},
		{"missing_event_type", `{"event_id":"e-1","aggregate_id":"order-1","event_version":1,"payload":{}}`},
		{"zero_version", `{"event_id":"e-1","aggregate_id":"order-1","event_type":"T","event_version":0,"payload":{}}`},
		{"negative_version", `{"event_id":"e-1","aggregate_id":"order-1","event_type":"T","event_version":-5,"payload":{}}`},
		{"float_version", `{"event_id":"e-1","aggregate_id":"order-1","event_type":"T","event_version":1.0,"payload":{}}`},
		{"exponent_version", `{"event_id":"e-1","aggregate_id":"order-1","event_type":"T","event_version":1e2,"payload":{}}`},
		{"string_version", `{"event_id":"e-1","aggregate_id":"order-1","event_type":"T","event_version":"1","payload":{}}`},
		{"overflow_version", `{"event_id":"e-1","aggregate_id":"order-1","event_type":"T","event_version":9223372036854775808,"payload":{}}`},
		{"number_event_id", `{"event_id":1,"aggregate_id":"order-1","event_type":"T","event_version":1,"payload":{}}`},
		{"bool_tenant", `{` + base + `,"tenant_id":true,"payload":{}}`},
		{"missing_payload", `{` + base + `}`},
		{"payload_null", `{` + base + `,"payload":null}`},
		{"bad_timestamp", `{` + base + `,"timestamp":"yesterday","payload":{}}`},
		{"timestamp_lowercase_t", `{` + base + `,"timestamp":"2024-01-01t00:00:00Z","payload":{}}`},
		{"timestamp_number", `{` + base + `,"timestamp":1700000000,"payload":{}}`},
		{"timestamp_escaped", `{` + base + `,"timestamp":"2024-01-01T00:00:00\u005a","payload":{}}`},
		{"timestamp_feb_30", `{` + base + `,"timestamp":"2024-02-30T00:00:00Z","payload":{}}`},
		{"control_char_in_string", "{\"event_id\":\"e\x01\",\"aggregate_id\":\"order-1\",\"event_type\":\"T\",\"event_version\":1,\"payload\":{}}"},
		{"bad_escape", `{"event_id":"e\x","aggregate_id":"order-1","event_type":"T","event_version":1,"payload":{}}`},
		{"single_quotes", `{'event_id':'e-1'}`},
		{"payload_invalid_json", `{` + base + `,"payload":{"a":}}`},
		{"payload_leading_zero", `{` + base + `,"payload":012}`},
	}
	var decodes []decodeCase
	for _, in := range inputs {
		c := decodeCase{Name: in.name, InputHex: hex.EncodeToString([]byte(in.input))}
		e, err := eventbus.FromBytes([]byte(in.input))
		if err != nil {
			c.GoError = err.Error()
		} else {
			c.Accepted = true
			out, err := e.ToBytes()
			if err != nil {
				panic(fmt.Sprintf("%s: %v", in.name, err))
			}
			c.ReencodeHex = hex.EncodeToString(out)
		}
		decodes = append(decodes, c)
	}

	out := map[string]interface{}{
		"generator": "interop/go/cmd/oracle: github.com/ChenBigdata421/jxt-core v1.7.5 sdk/pkg/eventbus",
		"encode":    encodes,
		"decode":    decodes,
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		panic(err)
	}
}
