// Command peer is a Go service beside this SDK in the interop tests: it publishes and consumes
// envelopes the way the Go SDK (jxt-core sdk/pkg/eventbus) does, with sarama and nats.go called
// exactly as the project's Go SDK inventory documents (the Go SDK's own module is not served by
// the Go module proxy reachable here; see docs/migration.md).
//
//	peer kafka-publish   -brokers B -topic T                     envelopes (JSON lines) from stdin
//	peer kafka-consume   -brokers B -topic T -group G [-count N]  handled envelopes to stdout
//	peer nats-publish    -url U -topic T [-stream S [-stream-subjects P,Q -storage memory]]
//	                                                              envelopes (JSON lines) from stdin
//	peer nats-subscribe  -url U -topic T -durable D [-count N]    handled envelopes to stdout
//	peer health-publish  -url U -topic T -source S                one health-check message
//	peer health-read     -url U -topic T -durable D [-count N]    health-check messages that pass
//	                                                              the Go SDK's checks, to stdout
//
// A consumer writes one JSON line per envelope it handled ({"aggregate_id", "event_version",
// "event_id", "event_type", "payload", "partition", "offset", "handled_at_ns"}: the wall clock,
// to merge its handlings with another process's), then stops after -count
// envelopes (0: until SIGTERM or SIGINT). Publishers print {"published": N} once every envelope
// was acknowledged.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"eventbus-interop/envelope"

	"github.com/IBM/sarama"
	"github.com/nats-io/nats.go"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: peer kafka-publish|kafka-consume|nats-publish|nats-subscribe [flags]")
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	brokers := flags.String("brokers", "", "Kafka bootstrap servers, comma-separated")
	url := flags.String("url", "", "NATS server URL")
	topic := flags.String("topic", "", "topic")
	group := flags.String("group", "", "Kafka consumer group")
	durable := flags.String("durable", "", "NATS durable consumer name")
	stream := flags.String("stream", "BUSINESS_STREAM", "the Go service's configured NATS stream (JetStream.Stream.Name)")
	subjects := flags.String("stream-subjects", "business.>", "the configured stream's subjects, comma-separated (JetStream.Stream.Subjects)")
	storage := flags.String("storage", "file", "the configured stream's storage: file or memory")
	count := flags.Int("count", 0, "stop after this many envelopes (0: until a signal)")
	source := flags.String("source", "go-peer", "health-check source")
	if err := flags.Parse(os.Args[2:]); err != nil {
		fail(err.Error())
	}
	if *topic == "" {
		fail("-topic is required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var err error
	switch os.Args[1] {
	case "kafka-publish":
		err = kafkaPublish(strings.Split(*brokers, ","), *topic)
	case "kafka-consume":
		err = kafkaConsume(ctx, strings.Split(*brokers, ","), *topic, *group, *count)
	case "nats-publish":
		err = natsPublish(*url, *topic, *stream, *subjects, *storage)
	case "nats-subscribe":
		err = natsSubscribe(ctx, *url, *topic, *durable, *count, *stream, *subjects, *storage)
	case "health-publish":
		if *brokers != "" {
			err = kafkaHealthPublish(strings.Split(*brokers, ","), *topic, *source)
		} else {
			err = healthPublish(*url, *topic, *source)
		}
	case "health-read":
		if *brokers != "" {
			err = kafkaHealthRead(ctx, strings.Split(*brokers, ","), *topic, *group, *count)
		} else {
			err = healthRead(ctx, *url, *topic, *durable, *count)
		}
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fail(err.Error())
	}
}

func fail(message string) {
	fmt.Fprintln(os.Stderr, "peer:", message)
	os.Exit(2)
}

// readEnvelopes reads one envelope per line of stdin, validated as the Go SDK does.
func readEnvelopes() ([]*envelope.Envelope, error) {
	var envelopes []*envelope.Envelope
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 16<<20)
	for line := 1; scanner.Scan(); line++ {
		if strings.TrimSpace(scanner.Text()) == "" {
			continue
		}
		e, err := envelope.FromBytes(scanner.Bytes())
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		envelopes = append(envelopes, e)
	}
	return envelopes, scanner.Err()
}

// handled is what a consumer writes per envelope.
type handled struct {
	AggregateID  string          `json:"aggregate_id"`
	EventVersion int64           `json:"event_version"`
	EventID      string          `json:"event_id"`
	EventType    string          `json:"event_type"`
	Payload      json.RawMessage `json:"payload"`
	Partition    int32           `json:"partition"`
	Offset       int64           `json:"offset"`
	HandledAtNs  int64           `json:"handled_at_ns"`
}

// output serialises handled lines from concurrent partition claims.
type output struct {
	mu      sync.Mutex
	written int
	done    chan struct{}
	limit   int
}

func newOutput(limit int) *output {
	return &output{done: make(chan struct{}), limit: limit}
}

// reached reports whether the limit was written.
func (o *output) reached() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.limit > 0 && o.written >= o.limit
}

func (o *output) write(e *envelope.Envelope, partition int32, offset int64) {
	line, _ := json.Marshal(handled{e.AggregateID, e.EventVersion, e.EventID, e.EventType, e.Payload, partition, offset, time.Now().UnixNano()})
	o.mu.Lock()
	defer o.mu.Unlock()
	os.Stdout.Write(append(line, '\n'))
	o.written++
	if o.limit > 0 && o.written == o.limit {
		close(o.done)
	}
}

// kafkaConfig is the Go SDK's sarama configuration after its converter
// (convertUserConfigToInternalKafkaConfig and NewKafkaEventBus, inventory §1.4 and §4.1).
func kafkaConfig() *sarama.Config {
	config := sarama.NewConfig()
	config.ClientID = "jxt-eventbus"
	config.Version = sarama.V3_0_0_0
	config.Producer.RequiredAcks = sarama.WaitForAll
	config.Producer.Idempotent = true
	config.Net.MaxOpenRequests = 1
	config.Producer.Flush.Bytes = 1 << 20
	config.Producer.Flush.Frequency = 10 * time.Millisecond
	config.Producer.Flush.Messages = 100
	config.Producer.Retry.Max = 3
	config.Producer.MaxMessageBytes = 1 << 20
	config.Producer.Partitioner = sarama.NewHashPartitioner
	config.Producer.Compression = sarama.CompressionNone
	config.Producer.Return.Successes = true
	config.Producer.Return.Errors = true
	config.ChannelBufferSize = 1000
	config.Consumer.Return.Errors = true
	config.Consumer.MaxProcessingTime = 30 * time.Second
	config.Consumer.Fetch.Min = 1024
	config.Consumer.Fetch.Max = 50 << 20
	config.Consumer.MaxWaitTime = 500 * time.Millisecond
	config.Consumer.IsolationLevel = sarama.ReadCommitted
	config.Consumer.Offsets.Initial = sarama.OffsetOldest
	config.Consumer.Offsets.Retry.Max = 3
	config.Consumer.Group.Rebalance.GroupStrategies = []sarama.BalanceStrategy{sarama.NewBalanceStrategyRange()}
	config.Consumer.Group.Rebalance.Timeout = 60 * time.Second
	config.Consumer.Group.Rebalance.Retry.Max = 4
	config.Consumer.Group.Rebalance.Retry.Backoff = 2 * time.Second
	config.Consumer.Group.Session.Timeout = 6 * time.Second
	config.Consumer.Group.Heartbeat.Interval = 500 * time.Millisecond
	config.Metadata.RefreshFrequency = 10 * time.Minute
	config.Metadata.Retry.Max = 3
	config.Metadata.Retry.Backoff = 250 * time.Millisecond
	return config
}

// kafkaPublish is the Go SDK's PublishEnvelope: Key = aggregate ID, the X-* headers in its
// order, through the AsyncProducer; it waits for every success.
func kafkaPublish(brokers []string, topic string) error {
	envelopes, err := readEnvelopes()
	if err != nil {
		return err
	}
	producer, err := sarama.NewAsyncProducer(brokers, kafkaConfig())
	if err != nil {
		return err
	}
	results := make(chan error, len(envelopes))
	go func() {
		for range producer.Successes() {
			results <- nil
		}
	}()
	go func() {
		for failure := range producer.Errors() {
			results <- failure.Err
		}
	}()
	for _, e := range envelopes {
		value, err := e.ToBytes()
		if err != nil {
			return err
		}
		headers := []sarama.RecordHeader{
			{Key: []byte("X-Event-ID"), Value: []byte(e.EventID)},
			{Key: []byte("X-Aggregate-ID"), Value: []byte(e.AggregateID)},
			{Key: []byte("X-Event-Version"), Value: []byte(strconv.FormatInt(e.EventVersion, 10))},
			{Key: []byte("X-Event-Type"), Value: []byte(e.EventType)},
		}
		if e.TraceID != "" {
			headers = append(headers, sarama.RecordHeader{Key: []byte("X-Trace-ID"), Value: []byte(e.TraceID)})
		}
		if e.CorrelationID != "" {
			headers = append(headers, sarama.RecordHeader{Key: []byte("X-Correlation-ID"), Value: []byte(e.CorrelationID)})
		}
		if e.TenantID != 0 {
			headers = append(headers, sarama.RecordHeader{Key: []byte("X-Tenant-ID"), Value: []byte(strconv.Itoa(e.TenantID))})
		}
		producer.Input() <- &sarama.ProducerMessage{
			Topic:   topic,
			Key:     sarama.StringEncoder(e.AggregateID),
			Value:   sarama.ByteEncoder(value),
			Headers: headers,
		}
	}
	for range envelopes {
		if err := <-results; err != nil {
			return err
		}
	}
	if err := producer.Close(); err != nil {
		return err
	}
	fmt.Printf("{\"published\":%d}\n", len(envelopes))
	return nil
}

// claims is the Go SDK's legacy serial path (inventory §4.3): one message at a time per
// partition, MarkMessage after it was handled; sarama commits marked offsets every second.
type claims struct {
	out *output
}

func (claims) Setup(sarama.ConsumerGroupSession) error   { return nil }
func (claims) Cleanup(sarama.ConsumerGroupSession) error { return nil }

func (c claims) ConsumeClaim(session sarama.ConsumerGroupSession, claim sarama.ConsumerGroupClaim) error {
	for {
		select {
		case message, ok := <-claim.Messages():
			if !ok {
				return nil
			}
			e, err := envelope.FromBytes(message.Value)
			if err != nil {
				fmt.Fprintf(os.Stderr, "peer: partition %d offset %d: %v\n", message.Partition, message.Offset, err)
			} else {
				c.out.write(e, message.Partition, message.Offset)
			}
			session.MarkMessage(message, "")
		case <-session.Context().Done():
			return nil
		}
	}
}

func kafkaConsume(ctx context.Context, brokers []string, topic, group string, count int) error {
	if group == "" {
		return fmt.Errorf("-group is required")
	}
	consumer, err := sarama.NewConsumerGroup(brokers, group, kafkaConfig())
	if err != nil {
		return err
	}
	go func() {
		for err := range consumer.Errors() {
			fmt.Fprintln(os.Stderr, "peer: consumer group:", err)
		}
	}()
	out := newOutput(count)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-out.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	fmt.Fprintln(os.Stderr, "peer: consuming", topic, "in group", group)
	for ctx.Err() == nil {
		if err := consumer.Consume(ctx, []string{topic}, claims{out}); err != nil && ctx.Err() == nil {
			fmt.Fprintln(os.Stderr, "peer: consume:", err)
			time.Sleep(2 * time.Second)
		}
	}
	// Close commits what was marked and leaves the group.
	return consumer.Close()
}

// natsConnect connects as the Go SDK does (inventory §5): the first URL, its reconnect options.
func natsConnect(url string) (*nats.Conn, nats.JetStreamContext, error) {
	conn, err := nats.Connect(url,
		nats.Name("go-peer"),
		nats.MaxReconnects(10),
		nats.ReconnectWait(2*time.Second),
		nats.Timeout(10*time.Second),
		nats.FlusherTimeout(10*time.Second),
		nats.PingInterval(20*time.Second),
		nats.ReconnectBufSize(1<<20),
	)
	if err != nil {
		return nil, nil, err
	}
	js, err := conn.JetStream(nats.PublishAsyncMaxPending(100000))
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	return conn, js, nil
}

// ensureConfiguredStream is the Go SDK's start-up on NATS with JetStream (ensureStreamExists):
// StreamInfo of the configured stream, else AddStream with its name, subjects and storage; a
// failure stops the service.
func ensureConfiguredStream(js nats.JetStreamContext, stream, subjects, storage string) error {
	if _, err := js.StreamInfo(stream); err == nil {
		return nil
	}
	kind := nats.FileStorage
	if storage == "memory" {
		kind = nats.MemoryStorage
	}
	if _, err := js.AddStream(&nats.StreamConfig{
		Name:      stream,
		Subjects:  strings.Split(subjects, ","),
		Storage:   kind,
		Retention: nats.LimitsPolicy,
		Replicas:  1,
	}); err != nil {
		return fmt.Errorf("start-up: ensure stream %s: %w", stream, err)
	}
	return nil
}

// subjectMatches is the Go SDK's own subject match: tokens split on ".", "*" matches one token,
// ">" (last) matches one or more.
func subjectMatches(pattern, subject string) bool {
	patterns := strings.Split(pattern, ".")
	tokens := strings.Split(subject, ".")
	for i, p := range patterns {
		if p == ">" {
			return i == len(patterns)-1 && len(tokens) > i
		}
		if i >= len(tokens) || (p != "*" && p != tokens[i]) {
			return false
		}
	}
	return len(tokens) == len(patterns)
}

// topicSuffix is the Go SDK's suffix of per-topic names: "." → "_", "*" → "wildcard",
// ">" → "all".
func topicSuffix(topic string) string {
	return strings.NewReplacer(".", "_", "*", "wildcard", ">", "all").Replace(topic)
}

// natsPublish is the Go SDK's PublishEnvelope on NATS: the service's start-up (its configured
// stream ensured), then the envelope's JSON as the body, no headers, js.PublishAsync. Like the Go
// SDK's PublishEnvelope it ensures no stream for the topic: a topic outside every stream gets no
// PubAck (the Go SDK only logs that and loses the event; the peer reports it and fails).
func natsPublish(url, topic, stream, subjects, storage string) error {
	envelopes, err := readEnvelopes()
	if err != nil {
		return err
	}
	conn, js, err := natsConnect(url)
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := ensureConfiguredStream(js, stream, subjects, storage); err != nil {
		return err
	}
	futures := make([]nats.PubAckFuture, 0, len(envelopes))
	for _, e := range envelopes {
		value, err := e.ToBytes()
		if err != nil {
			return err
		}
		future, err := js.PublishAsync(topic, value)
		if err != nil {
			return err
		}
		futures = append(futures, future)
	}
	for _, future := range futures {
		select {
		case <-future.Ok():
		case err := <-future.Err():
			return err
		case <-time.After(30 * time.Second):
			return fmt.Errorf("no PubAck within 30 s")
		}
	}
	fmt.Printf("{\"published\":%d}\n", len(envelopes))
	return nil
}

// natsSubscribe is the Go SDK's JetStream envelope subscription (inventory §5): the service's
// start-up (its configured stream ensured); then, unless the configured stream's subjects match
// the topic, a dedicated file stream {StreamName}_{suffix} over the topic is ensured (StreamInfo,
// else AddStream: JetStream refuses it when another stream already covers the topic, and the
// subscription fails); then a pull subscription on the durable, Fetch(500, MaxWait 100 ms), the
// batch handled strictly one message after another, Ack after each.
func natsSubscribe(ctx context.Context, url, topic, durable string, count int, stream, subjects, storage string) error {
	if durable == "" {
		return fmt.Errorf("-durable is required")
	}
	conn, js, err := natsConnect(url)
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := ensureConfiguredStream(js, stream, subjects, storage); err != nil {
		return err
	}
	covered := false
	for _, subject := range strings.Split(subjects, ",") {
		if subjectMatches(subject, topic) {
			covered = true
		}
	}
	if !covered {
		dedicated := stream + "_" + topicSuffix(topic)
		if info, err := js.StreamInfo(dedicated); err == nil {
			if info.Config.Storage != nats.FileStorage {
				fmt.Fprintln(os.Stderr, "peer: stream", dedicated, "has another storage type")
			}
		} else if _, err := js.AddStream(&nats.StreamConfig{
			Name:      dedicated,
			Subjects:  []string{topic},
			Storage:   nats.FileStorage,
			Retention: nats.LimitsPolicy,
			Replicas:  1,
		}); err != nil {
			return fmt.Errorf("subscribe: ensure stream %s: %w", dedicated, err)
		}
	}
	subscription, err := js.PullSubscribe(topic, durable)
	if err != nil {
		return err
	}
	out := newOutput(count)
	fmt.Fprintln(os.Stderr, "peer: subscribed to", topic, "as", durable)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-out.done:
			return nil
		default:
		}
		messages, err := subscription.Fetch(500, nats.MaxWait(100*time.Millisecond))
		if err != nil && err != nats.ErrTimeout {
			fmt.Fprintln(os.Stderr, "peer: fetch:", err)
			time.Sleep(time.Second)
			continue
		}
		for _, message := range messages {
			// Stopping mid-batch, as a service that stops does: the rest of the batch stays
			// delivered and unacknowledged.
			if out.reached() {
				return nil
			}
			e, err := envelope.FromBytes(message.Data)
			if err != nil {
				fmt.Fprintln(os.Stderr, "peer: undecodable envelope:", err)
				message.Nak()
				continue
			}
			meta, _ := message.Metadata()
			var sequence int64
			if meta != nil {
				sequence = int64(meta.Sequence.Stream)
			}
			out.write(e, 0, sequence)
			if err := message.AckSync(); err != nil {
				fmt.Fprintln(os.Stderr, "peer: ack:", err)
			}
		}
	}
}

// healthCheckMessage is the Go SDK's health-check message (inventory §6.1).
type healthCheckMessage struct {
	MessageID    string            `json:"messageId"`
	Timestamp    time.Time         `json:"timestamp"`
	Source       string            `json:"source"`
	EventBusType string            `json:"eventBusType"`
	Version      string            `json:"version"`
	Metadata     map[string]string `json:"metadata"`
}

// validate is the Go SDK's parse validation: required fields, at most 5 minutes old, a known
// bus type.
func (m *healthCheckMessage) validate() error {
	if m.MessageID == "" || m.Source == "" || m.EventBusType == "" || m.Timestamp.IsZero() {
		return fmt.Errorf("missing required fields")
	}
	if time.Since(m.Timestamp) > 5*time.Minute {
		return fmt.Errorf("message too old")
	}
	switch m.EventBusType {
	case "kafka", "nats", "memory":
		return nil
	}
	return fmt.Errorf("unknown event bus type %q", m.EventBusType)
}

// newHealthCheck is the Go SDK's health-check message of `source` on a bus of `busType`.
func newHealthCheck(source, busType string) ([]byte, error) {
	now := time.Now()
	return json.Marshal(healthCheckMessage{
		MessageID:    fmt.Sprintf("hc-%d-%016x", now.UnixNano(), now.UnixNano()*2654435761),
		Timestamp:    now,
		Source:       source,
		EventBusType: busType,
		Version:      "2.0.0",
		Metadata:     map[string]string{"checkType": "periodic", "instanceId": fmt.Sprintf("%s-%d", source, now.Unix())},
	})
}

// printHealthCheck prints a health-check message that passes the Go SDK's checks as a JSON line
// and says why on stderr when it does not; true when printed.
func printHealthCheck(data []byte) bool {
	var health healthCheckMessage
	if err := json.Unmarshal(data, &health); err != nil {
		fmt.Fprintln(os.Stderr, "peer: not a health-check message:", err)
		return false
	}
	if err := health.validate(); err != nil {
		fmt.Fprintln(os.Stderr, "peer: health-check message refused:", err)
		return false
	}
	line, _ := json.Marshal(health)
	os.Stdout.Write(append(line, '\n'))
	return true
}

// kafkaHealthPublish sends one health-check message as the Go SDK's HealthChecker does on
// Kafka: bus.Publish of its JSON, a plain record without key or headers (sent with a
// SyncProducer: the same record as the Go SDK's AsyncProducer sends, and the peer knows it was
// acknowledged before it exits).
func kafkaHealthPublish(brokers []string, topic, source string) error {
	body, err := newHealthCheck(source, "kafka")
	if err != nil {
		return err
	}
	producer, err := sarama.NewSyncProducer(brokers, kafkaConfig())
	if err != nil {
		return err
	}
	defer producer.Close()
	if _, _, err := producer.SendMessage(&sarama.ProducerMessage{Topic: topic, Value: sarama.ByteEncoder(body)}); err != nil {
		return err
	}
	fmt.Printf("{\"published\":1}\n")
	return nil
}

// healthClaims prints the health-check messages of its claims that pass the Go SDK's checks.
type healthClaims struct {
	printed chan<- struct{}
}

func (healthClaims) Setup(sarama.ConsumerGroupSession) error   { return nil }
func (healthClaims) Cleanup(sarama.ConsumerGroupSession) error { return nil }

func (c healthClaims) ConsumeClaim(session sarama.ConsumerGroupSession, claim sarama.ConsumerGroupClaim) error {
	for {
		select {
		case message, ok := <-claim.Messages():
			if !ok {
				return nil
			}
			if printHealthCheck(message.Value) {
				c.printed <- struct{}{}
			}
			session.MarkMessage(message, "")
		case <-session.Context().Done():
			return nil
		}
	}
}

// kafkaHealthRead reads health-check messages as the Go SDK's HealthCheckSubscriber does on
// Kafka (bus.Subscribe: a member of the service's consumer group) until `count` passed its
// checks.
func kafkaHealthRead(ctx context.Context, brokers []string, topic, group string, count int) error {
	if group == "" {
		return fmt.Errorf("-group is required")
	}
	consumer, err := sarama.NewConsumerGroup(brokers, group, kafkaConfig())
	if err != nil {
		return err
	}
	defer consumer.Close()
	printed := make(chan struct{}, 1024)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		for read := 0; count == 0 || read < count; read++ {
			select {
			case <-printed:
			case <-ctx.Done():
				return
			}
		}
		cancel()
	}()
	for ctx.Err() == nil {
		if err := consumer.Consume(ctx, []string{topic}, healthClaims{printed}); err != nil && ctx.Err() == nil {
			fmt.Fprintln(os.Stderr, "peer: consume:", err)
			time.Sleep(2 * time.Second)
		}
	}
	return nil
}

// healthPublish sends one health-check message as the Go SDK's HealthChecker does: bus.Publish
// of its JSON (on NATS: the topic's stream ensured, then PublishAsync, no headers).
func healthPublish(url, topic, source string) error {
	body, err := newHealthCheck(source, "nats")
	if err != nil {
		return err
	}
	conn, js, err := natsConnect(url)
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := js.StreamNameBySubject(topic); err != nil {
		stream := "STREAM_" + strings.ReplaceAll(topic, ".", "_")
		if _, err := js.AddStream(&nats.StreamConfig{Name: stream, Subjects: []string{topic}, Storage: nats.FileStorage}); err != nil {
			return fmt.Errorf("ensure stream %s: %w", stream, err)
		}
	}
	future, err := js.PublishAsync(topic, body)
	if err != nil {
		return err
	}
	select {
	case <-future.Ok():
	case err := <-future.Err():
		return err
	case <-time.After(30 * time.Second):
		return fmt.Errorf("no PubAck within 30 s")
	}
	fmt.Printf("{\"published\":1}\n")
	return nil
}

// healthRead reads health-check messages with a pull durable and prints those that pass the Go
// SDK's checks as JSON lines; the others go to stderr.
func healthRead(ctx context.Context, url, topic, durable string, count int) error {
	conn, js, err := natsConnect(url)
	if err != nil {
		return err
	}
	defer conn.Close()
	subscription, err := js.PullSubscribe(topic, durable)
	if err != nil {
		return err
	}
	read := 0
	for count == 0 || read < count {
		select {
		case <-ctx.Done():
			return nil
		default:
		}
		messages, err := subscription.Fetch(10, nats.MaxWait(100*time.Millisecond))
		if err != nil && err != nats.ErrTimeout {
			return err
		}
		for _, message := range messages {
			if printHealthCheck(message.Data) {
				read++
			}
			message.AckSync()
		}
	}
	return nil
}
