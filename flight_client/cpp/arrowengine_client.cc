// arrowengine_client: embed a folder of images or the lines of a text file on an
// ArrowEngine Flight server, from C++, and write the embeddings to an Arrow IPC file.
//
// Wire protocol (flight_server/protocol.py): one DoExchange call whose descriptor is
// FlightDescriptor::Command(<UTF-8 JSON>), e.g.
//     {"model": "clip", "input": "image", "column": "image", "passthrough": ["name"]}
// The client streams record batches {name: utf8, image: binary} (or {line: int64,
// text: utf8}); the server answers every input batch with one batch of the same rows:
// the passthrough column, `embedding: fixed_size_list<float32>[D]` (null where the row
// failed) and `error: utf8` (null where it succeeded). Those result batches are written,
// unchanged, to the output Arrow IPC file.
//
// Exit status: 0 every row embedded, 3 done but some rows failed (see the `error`
// column), 1 the call failed (connection, auth, request rejected, I/O), 2 bad usage.
// Build: see build.py / README.md in this folder.

#include <arrow/api.h>
#include <arrow/flight/api.h>
#include <arrow/io/file.h>
#include <arrow/ipc/api.h>
#include <arrow/util/utf8.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace fs = std::filesystem;
namespace flight = arrow::flight;

namespace {

constexpr int kExitOk = 0;
constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;
constexpr int kExitRowErrors = 3;
constexpr int kMaxPrintedRowErrors = 10;

struct Options {
  std::string server = "grpc+tcp://127.0.0.1:8815";
  std::string input;  // "image" | "text"
  fs::path source;    // folder of images, or text file (one row per line)
  fs::path output;    // Arrow IPC file
  std::optional<std::string> model;
  std::optional<std::string> column;
  std::optional<fs::path> token_file;
  std::optional<fs::path> tls_root_certs;
  std::string override_hostname;
  int64_t batch_rows = 256;
  int64_t batch_bytes = 64LL << 20;
  bool normalize = true;
};

constexpr std::string_view kUsage =
    "usage: arrowengine_client --input image|text --source PATH --output OUT.arrow\n"
    "         [--server grpc+tcp://HOST:PORT] [--model NAME] [--column NAME]\n"
    "         [--batch-rows N] [--batch-bytes BYTES] [--no-normalize]\n"
    "         [--token-file FILE] [--tls-root-certs CA.pem] [--override-hostname NAME]\n"
    "  --input image: every regular file of the folder --source (sorted by name, not\n"
    "                 recursive, dot-files skipped) is one row of the binary column.\n"
    "  --input text:  every line of the file --source is one row of the utf8 column.\n"
    "  Output: Arrow IPC file with columns name|line, embedding, error.\n"
    "  Exit: 0 all rows ok, 3 some rows failed, 1 call failed, 2 bad usage.\n";

// ---- small helpers ---------------------------------------------------------------------

arrow::Status UsageError(const std::string& message) {
  return arrow::Status::Invalid(message);
}

arrow::Result<int64_t> ParsePositive(const std::string& flag, const std::string& text) {
  try {
    size_t used = 0;
    const long long value = std::stoll(text, &used);
    if (used == text.size() && value > 0) return static_cast<int64_t>(value);
  } catch (const std::exception&) {
  }
  return UsageError(flag + " needs a positive integer; got '" + text + "'");
}

arrow::Result<Options> ParseArgs(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      std::cout << kUsage;
      std::exit(kExitOk);
    }
    if (flag == "--no-normalize") {
      opt.normalize = false;
      continue;
    }
    if (i + 1 >= argc) return UsageError(flag + " needs a value (or is unknown)");
    const std::string value = argv[++i];
    if (flag == "--server") {
      opt.server = value;
    } else if (flag == "--input") {
      opt.input = value;
    } else if (flag == "--source") {
      opt.source = value;
    } else if (flag == "--output") {
      opt.output = value;
    } else if (flag == "--model") {
      opt.model = value;
    } else if (flag == "--column") {
      opt.column = value;
    } else if (flag == "--token-file") {
      opt.token_file = value;
    } else if (flag == "--tls-root-certs") {
      opt.tls_root_certs = value;
    } else if (flag == "--override-hostname") {
      opt.override_hostname = value;
    } else if (flag == "--batch-rows") {
      ARROW_ASSIGN_OR_RAISE(opt.batch_rows, ParsePositive(flag, value));
    } else if (flag == "--batch-bytes") {
      ARROW_ASSIGN_OR_RAISE(opt.batch_bytes, ParsePositive(flag, value));
    } else {
      return UsageError("unknown option '" + flag + "'");
    }
  }
  if (opt.input != "image" && opt.input != "text") {
    return UsageError("--input must be 'image' or 'text'; got '" + opt.input + "'");
  }
  if (!(opt.server.starts_with("grpc://") || opt.server.starts_with("grpc+tcp://") ||
        opt.server.starts_with("grpc+tls://") || opt.server.starts_with("grpc+unix://"))) {
    return UsageError("--server must be a Flight URI: grpc://HOST:PORT, grpc+tcp://, grpc+tls:// or "
                      "grpc+unix://; got '" + opt.server + "'");
  }
  if (opt.source.empty()) return UsageError("--source is required (a folder of images or a text file)");
  if (opt.output.empty()) return UsageError("--output is required (the Arrow IPC file to write)");
  if (opt.model && opt.model->empty()) return UsageError("--model must not be empty");
  if (opt.column && (opt.column->empty() || *opt.column == "name" || *opt.column == "line")) {
    return UsageError("--column must be a non-empty name other than 'name' and 'line'");
  }
  return opt;
}

arrow::Result<std::string> ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return arrow::Status::IOError("cannot open '", path.string(), "' for reading");
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (in.bad()) return arrow::Status::IOError("cannot read '", path.string(), "'");
  return std::move(bytes).str();
}

std::string JsonString(std::string_view text) {
  std::string out = "\"";
  for (const unsigned char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char escaped[8];
          std::snprintf(escaped, sizeof(escaped), "\\u%04x", c);
          out += escaped;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

// The command JSON of flight_server/protocol.py; `key` is the passthrough column.
std::string CommandJson(const Options& opt, const std::string& column, const std::string& key) {
  std::string json = "{";
  if (opt.model) json += "\"model\": " + JsonString(*opt.model) + ", ";
  json += "\"input\": " + JsonString(opt.input) + ", \"column\": " + JsonString(column) +
          ", \"normalize\": " + (opt.normalize ? "true" : "false") +
          ", \"passthrough\": [" + JsonString(key) + "]}";
  return json;
}

// ---- input: one record batch at a time ------------------------------------------------

// Yields the input as record batches of at most batch_rows rows / ~batch_bytes bytes.
class InputSource {
 public:
  static arrow::Result<std::unique_ptr<InputSource>> Open(const Options& opt, const std::string& column) {
    auto source = std::unique_ptr<InputSource>(new InputSource(opt, column));
    if (opt.input == "image") {
      std::error_code ec;
      if (!fs::is_directory(opt.source, ec)) {
        return arrow::Status::IOError("--source '", opt.source.string(), "' is not a folder; --input image ",
                                      "needs a folder of image files");
      }
      for (const auto& entry : fs::directory_iterator(opt.source)) {
        const std::string name = entry.path().filename().string();
        if (entry.is_regular_file() && !name.starts_with(".")) source->files_.push_back(entry.path());
      }
      std::sort(source->files_.begin(), source->files_.end(),
                [](const fs::path& a, const fs::path& b) { return a.filename().string() < b.filename().string(); });
      source->schema_ = arrow::schema({arrow::field("name", arrow::utf8()), arrow::field(column, arrow::binary())});
    } else {
      source->lines_.open(opt.source, std::ios::binary);
      if (!source->lines_) {
        return arrow::Status::IOError("cannot open the text file --source '", opt.source.string(), "'");
      }
      source->schema_ = arrow::schema({arrow::field("line", arrow::int64()), arrow::field(column, arrow::utf8())});
    }
    return source;
  }

  const std::shared_ptr<arrow::Schema>& schema() const { return schema_; }

  // The next batch, or nullptr at the end.
  arrow::Result<std::shared_ptr<arrow::RecordBatch>> Next() {
    return opt_.input == "image" ? NextImages() : NextLines();
  }

 private:
  InputSource(const Options& opt, std::string column) : opt_(opt), column_(std::move(column)) {}

  arrow::Result<std::shared_ptr<arrow::RecordBatch>> NextImages() {
    if (next_file_ >= files_.size()) return nullptr;
    arrow::StringBuilder names;
    arrow::BinaryBuilder images;
    int64_t rows = 0, bytes = 0;
    while (next_file_ < files_.size() && rows < opt_.batch_rows) {
      const fs::path& path = files_[next_file_];
      std::error_code ec;
      const auto size = static_cast<int64_t>(fs::file_size(path, ec));
      if (rows > 0 && !ec && bytes + size > opt_.batch_bytes) break;  // it starts the next batch
      ++next_file_;
      ARROW_ASSIGN_OR_RAISE(std::string data, ReadFile(path));
      ARROW_RETURN_NOT_OK(names.Append(path.filename().string()));
      ARROW_RETURN_NOT_OK(images.Append(data));
      bytes += static_cast<int64_t>(data.size());
      ++rows;
    }
    return Finish(rows, names, images);
  }

  arrow::Result<std::shared_ptr<arrow::RecordBatch>> NextLines() {
    arrow::Int64Builder numbers;
    arrow::StringBuilder texts;
    int64_t rows = 0, bytes = 0;
    std::string line;
    while (rows < opt_.batch_rows && (rows == 0 || bytes < opt_.batch_bytes) && std::getline(lines_, line)) {
      ++line_number_;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (!arrow::util::ValidateUTF8(line)) {
        return arrow::Status::Invalid("line ", line_number_, " of '", opt_.source.string(),
                                      "' is not valid UTF-8; the text input must be UTF-8");
      }
      ARROW_RETURN_NOT_OK(numbers.Append(line_number_));
      ARROW_RETURN_NOT_OK(texts.Append(line));
      bytes += static_cast<int64_t>(line.size());
      ++rows;
    }
    if (lines_.bad()) return arrow::Status::IOError("cannot read '", opt_.source.string(), "'");
    if (rows == 0) return nullptr;
    return Finish(rows, numbers, texts);
  }

  arrow::Result<std::shared_ptr<arrow::RecordBatch>> Finish(int64_t rows, arrow::ArrayBuilder& key,
                                                            arrow::ArrayBuilder& values) {
    ARROW_ASSIGN_OR_RAISE(auto key_array, key.Finish());
    ARROW_ASSIGN_OR_RAISE(auto value_array, values.Finish());
    return arrow::RecordBatch::Make(schema_, rows, {key_array, value_array});
  }

  const Options& opt_;
  std::string column_;
  std::shared_ptr<arrow::Schema> schema_;
  std::vector<fs::path> files_;
  size_t next_file_ = 0;
  std::ifstream lines_;
  int64_t line_number_ = 0;
};

// ---- the exchange ----------------------------------------------------------------------

struct Summary {
  int64_t rows = 0;
  int64_t failed = 0;
  int64_t batches = 0;
  int32_t dim = 0;
};

struct SenderResult {
  arrow::Status status;        // first error, OK if none
  bool local = false;          // the error is ours (input file), not the stream's
  int64_t rows = 0;            // rows sent
};

// Who half-closes the input (DoneWriting): whichever thread last sees every batch sent and answered.
// Never while the reading thread may be closing the call on a server error: Arrow's client then runs
// two gRPC WritesDone at once and aborts the process ("API misuse ... TOO_MANY_OPERATIONS"). The
// server answers every input batch as it goes, so all results arrive before the half-close.
struct HalfClose {
  std::mutex mutex;
  int64_t sent = 0, answered = 0;
  bool all_sent = false, closed = false;

  // Under `mutex`: true for the one caller that should call DoneWriting now.
  bool Take() {
    if (all_sent && answered == sent && !closed) {
      closed = true;
      return true;
    }
    return false;
  }
  void BatchSent() { std::lock_guard<std::mutex> guard(mutex); ++sent; }
  bool AllSent() { std::lock_guard<std::mutex> guard(mutex); all_sent = true; return Take(); }
  bool Answered() { std::lock_guard<std::mutex> guard(mutex); ++answered; return Take(); }
};

// Sends every input batch, then half-closes; runs on its own thread so that results are
// read while batches are still being sent (gRPC flow control bounds the memory).
void SendAll(InputSource* input, flight::FlightStreamWriter* writer, flight::FlightStreamReader* reader,
             HalfClose* half_close, SenderResult* result) {
  auto fail = [&](const arrow::Status& status, bool local) {
    result->status = status;
    result->local = local;
    // Our own error: cancel the call so that the reading thread stops. A stream error
    // means the call is over already; the reader then gets the server's own status.
    if (local) reader->Cancel();
  };
  arrow::Status status = writer->Begin(input->schema());
  if (!status.ok()) return fail(status, false);
  bool sent_any = false;
  while (true) {
    auto next = input->Next();
    if (!next.ok()) return fail(next.status(), true);
    std::shared_ptr<arrow::RecordBatch> batch = *next;
    if (batch == nullptr) {
      if (sent_any) break;
      // No input rows at all: one empty batch, so that the output file gets its schema.
      auto empty = arrow::RecordBatch::MakeEmpty(input->schema());
      if (!empty.ok()) return fail(empty.status(), true);
      batch = *empty;
    }
    status = writer->WriteRecordBatch(*batch);
    if (!status.ok()) return fail(status, false);
    half_close->BatchSent();
    result->rows += batch->num_rows();
    sent_any = true;
  }
  if (half_close->AllSent()) {  // every answer is in: the reader waits for the end of the stream
    status = writer->DoneWriting();
    if (!status.ok()) return fail(status, false);
  }
}

void ReportRowErrors(const arrow::RecordBatch& batch, const std::string& key, int64_t* printed) {
  const auto errors = std::static_pointer_cast<arrow::StringArray>(batch.GetColumnByName("error"));
  const auto keys = batch.GetColumnByName(key);
  for (int64_t i = 0; i < batch.num_rows() && *printed < kMaxPrintedRowErrors; ++i) {
    if (errors->IsNull(i)) continue;
    const auto scalar = keys->GetScalar(i);
    std::cerr << "row error: " << key << " " << (scalar.ok() ? (*scalar)->ToString() : "?") << ": "
              << errors->GetView(i) << "\n";
    ++*printed;
  }
}

arrow::Status CheckResultSchema(const arrow::Schema& schema, const std::string& key, int32_t* dim) {
  const auto embedding = schema.GetFieldByName("embedding");
  const auto error = schema.GetFieldByName("error");
  if (embedding == nullptr || error == nullptr || schema.GetFieldByName(key) == nullptr ||
      embedding->type()->id() != arrow::Type::FIXED_SIZE_LIST || error->type()->id() != arrow::Type::STRING) {
    return arrow::Status::Invalid("the server answered with schema ", schema.ToString(), "; expected ", key,
                                  ", embedding: fixed_size_list<float>[D], error: string");
  }
  const auto& list = static_cast<const arrow::FixedSizeListType&>(*embedding->type());
  if (list.value_type()->id() != arrow::Type::FLOAT) {
    return arrow::Status::Invalid("embedding values are ", list.value_type()->ToString(), "; expected float");
  }
  *dim = list.list_size();
  return arrow::Status::OK();
}

// The integer after "key": in the server's JSON answer to the `limits` action, if it is there.
std::optional<int64_t> JsonInt(const std::string& json, const std::string& key) {
  const auto at = json.find("\"" + key + "\":");
  if (at == std::string::npos) return std::nullopt;
  try {
    return std::stoll(json.substr(at + key.size() + 3));
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

// Lowers --batch-rows / --batch-bytes to the server's own limits (its `limits` action), so that a server
// started with smaller --max-batch-rows / --max-batch-bytes does not refuse the batches.
void FitServerLimits(flight::FlightClient* client, const flight::FlightCallOptions& call_options,
                     Options* opt) {
  auto results = client->DoAction(call_options, flight::Action{"limits", nullptr});
  if (!results.ok()) return;  // an older server: keep the options as given
  auto result = (*results)->Next();
  if (!result.ok() || *result == nullptr || (*result)->body == nullptr) return;
  const std::string json = (*result)->body->ToString();
  if (auto rows = JsonInt(json, "max_batch_rows"); rows && *rows > 0 && *rows < opt->batch_rows) {
    opt->batch_rows = *rows;
  }
  if (auto bytes = JsonInt(json, "max_batch_bytes"); bytes && *bytes > 0 && *bytes < opt->batch_bytes) {
    opt->batch_bytes = *bytes;
  }
}

arrow::Result<Summary> Run(Options opt) {
  const std::string column = opt.column.value_or(opt.input);  // protocol default: "image" / "text"
  const std::string key = opt.input == "image" ? "name" : "line";
  ARROW_ASSIGN_OR_RAISE(auto input, InputSource::Open(opt, column));  // reads opt's batch sizes as they are then

  ARROW_ASSIGN_OR_RAISE(auto location, flight::Location::Parse(opt.server));
  auto client_options = flight::FlightClientOptions::Defaults();
  if (opt.tls_root_certs) {
    ARROW_ASSIGN_OR_RAISE(client_options.tls_root_certs, ReadFile(*opt.tls_root_certs));
  }
  client_options.override_hostname = opt.override_hostname;
  ARROW_ASSIGN_OR_RAISE(auto client, flight::FlightClient::Connect(location, client_options));

  flight::FlightCallOptions call_options;
  if (opt.token_file) {
    ARROW_ASSIGN_OR_RAISE(std::string token, ReadFile(*opt.token_file));
    const auto begin = token.find_first_not_of(" \t\r\n");
    const auto end = token.find_last_not_of(" \t\r\n");
    token = begin == std::string::npos ? std::string() : token.substr(begin, end - begin + 1);
    if (token.empty()) return UsageError("the token file '" + opt.token_file->string() + "' is empty");
    if (token.find_first_of(" \t\r\n") != std::string::npos) {
      return UsageError("the token file '" + opt.token_file->string() +
                        "' holds more than one line or spaces inside the token; put the token alone on one line");
    }
    call_options.headers.emplace_back("authorization", "Bearer " + token);
  }
  FitServerLimits(client.get(), call_options, &opt);

  const auto descriptor = flight::FlightDescriptor::Command(CommandJson(opt, column, key));
  ARROW_ASSIGN_OR_RAISE(auto exchange, client->DoExchange(call_options, descriptor));

  SenderResult sent;
  HalfClose half_close;
  std::thread sender(SendAll, input.get(), exchange.writer.get(), exchange.reader.get(), &half_close, &sent);

  // Written under OUTPUT.part, renamed to OUTPUT once complete: no half file on failure.
  const fs::path partial = fs::path(opt.output).concat(".part");
  Summary summary;
  arrow::Status read_status = [&]() -> arrow::Status {
    std::shared_ptr<arrow::ipc::RecordBatchWriter> file;
    int64_t printed = 0;
    while (true) {
      ARROW_ASSIGN_OR_RAISE(auto chunk, exchange.reader->Next());
      if (chunk.data == nullptr) break;
      const auto& batch = *chunk.data;
      if (file == nullptr) {
        ARROW_RETURN_NOT_OK(CheckResultSchema(*batch.schema(), key, &summary.dim));
        ARROW_ASSIGN_OR_RAISE(auto sink, arrow::io::FileOutputStream::Open(partial.string()));
        ARROW_ASSIGN_OR_RAISE(file, arrow::ipc::MakeFileWriter(sink, batch.schema()));
      }
      ARROW_RETURN_NOT_OK(file->WriteRecordBatch(batch));
      const int64_t failed = batch.GetColumnByName("error")->length() - batch.GetColumnByName("error")->null_count();
      if (failed > 0) ReportRowErrors(batch, key, &printed);
      summary.rows += batch.num_rows();
      summary.failed += failed;
      summary.batches += 1;
      if (half_close.Answered()) ARROW_RETURN_NOT_OK(exchange.writer->DoneWriting());  // no read in flight
    }
    if (file == nullptr) return arrow::Status::IOError("the server sent no result batch");
    return file->Close();
  }();
  if (!read_status.ok()) exchange.reader->Cancel();  // unblock the sender
  sender.join();
  std::error_code ec;
  auto discard = [&](arrow::Status status) -> arrow::Status {
    static_cast<void>(exchange.writer->Close());  // already failed: only end the call quietly
    fs::remove(partial, ec);
    return status;
  };

  // Report the root cause: our own input error first, then what the server said.
  if (!sent.status.ok() && sent.local) return discard(sent.status);
  if (!read_status.ok()) return discard(read_status);
  if (!sent.status.ok()) return discard(sent.status);
  if (auto status = exchange.writer->Close(); !status.ok()) return discard(status);
  if (summary.rows != sent.rows) {
    return discard(arrow::Status::IOError("sent ", sent.rows, " rows but received ", summary.rows, " result rows"));
  }
  fs::rename(partial, opt.output, ec);
  if (ec) {
    return discard(arrow::Status::IOError("cannot rename '", partial.string(), "' to '", opt.output.string(),
                                          "': ", ec.message()));
  }
  if (summary.failed > kMaxPrintedRowErrors) {
    std::cerr << "row error: ... and " << (summary.failed - kMaxPrintedRowErrors) << " more (see the error column)\n";
  }
  return summary;
}

}  // namespace

int main(int argc, char** argv) {
  arrow::util::InitializeUTF8();  // ValidateUTF8 needs its lookup tables
  auto options = ParseArgs(argc, argv);
  if (!options.ok()) {
    std::cerr << "arrowengine_client: " << options.status().message() << "\n" << kUsage;
    return kExitUsage;
  }
  const auto start = std::chrono::steady_clock::now();
  auto summary = Run(*options);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!summary.ok()) {
    std::cerr << "arrowengine_client: failed: " << summary.status().ToString() << "\n";
    return kExitFailed;
  }
  std::printf("arrowengine_client: %lld rows (%lld failed) in %lld batches, dim %d, %.2f s, %.1f rows/s -> %s\n",
              static_cast<long long>(summary->rows), static_cast<long long>(summary->failed),
              static_cast<long long>(summary->batches), summary->dim, seconds,
              seconds > 0 ? static_cast<double>(summary->rows) / seconds : 0.0, options->output.c_str());
  return summary->failed > 0 ? kExitRowErrors : kExitOk;
}
