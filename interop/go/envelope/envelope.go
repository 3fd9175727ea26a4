// Package envelope restates the Go SDK's envelope.go (jxt-core sdk/pkg/eventbus, as documented
// in the project's Go SDK inventory): the same field tags, jsoniter
// ConfigCompatibleWithStandardLibrary with ValidateJsonRawMessage, and the same validation order
// and messages. The Go SDK's own module is not served by the Go module proxy reachable here
// (403), so the wire oracle and the interop peer share this one restatement.
package envelope

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode"

	jsoniter "github.com/json-iterator/go"
)

// sdkJSON is jsoniter's ConfigCompatibleWithStandardLibrary with ValidateJsonRawMessage.
var sdkJSON = jsoniter.Config{
	EscapeHTML:             true,
	SortMapKeys:            true,
	ValidateJsonRawMessage: true,
}.Froze()

// Envelope is the Go SDK's Envelope.
type Envelope struct {
	EventID       string          `json:"event_id"`
	AggregateID   string          `json:"aggregate_id"`
	EventType     string          `json:"event_type"`
	EventVersion  int64           `json:"event_version"`
	Timestamp     time.Time       `json:"timestamp"`
	TraceID       string          `json:"trace_id,omitempty"`
	CorrelationID string          `json:"correlation_id,omitempty"`
	TenantID      int             `json:"tenant_id,omitempty"`
	Payload       json.RawMessage `json:"payload"`
}

// ValidateAggregateID is the Go SDK's validateAggregateID.
func ValidateAggregateID(id string) error {
	id = strings.TrimSpace(id)
	if id == "" {
		return errors.New("aggregate_id cannot be empty")
	}
	if len(id) > 256 {
		return errors.New("aggregate_id too long (max 256 characters)")
	}
	for _, r := range id {
		if !(r < unicode.MaxASCII && (unicode.IsLetter(r) || unicode.IsDigit(r) || strings.ContainsRune(":_-./", r))) {
			return fmt.Errorf("aggregate_id contains invalid character: %c", r)
		}
	}
	return nil
}

// Validate checks the fields in the Go SDK's order, with its messages.
func (e *Envelope) Validate() error {
	if strings.TrimSpace(e.EventID) == "" {
		return errors.New("event_id is required")
	}
	if strings.TrimSpace(e.AggregateID) == "" {
		return errors.New("aggregate_id is required")
	}
	if strings.TrimSpace(e.EventType) == "" {
		return errors.New("event_type is required")
	}
	if e.EventVersion <= 0 {
		return errors.New("event_version must be positive")
	}
	if len(e.Payload) == 0 {
		return errors.New("payload is required")
	}
	if err := ValidateAggregateID(e.AggregateID); err != nil {
		return fmt.Errorf("invalid aggregate_id: %w", err)
	}
	return nil
}

// ToBytes validates and encodes.
func (e *Envelope) ToBytes() ([]byte, error) {
	if err := e.Validate(); err != nil {
		return nil, err
	}
	return sdkJSON.Marshal(e)
}

// FromBytes decodes and validates.
func FromBytes(data []byte) (*Envelope, error) {
	var e Envelope
	if err := sdkJSON.Unmarshal(data, &e); err != nil {
		return nil, fmt.Errorf("failed to unmarshal envelope: %w", err)
	}
	if err := e.Validate(); err != nil {
		return nil, fmt.Errorf("invalid envelope: %w", err)
	}
	return &e, nil
}
