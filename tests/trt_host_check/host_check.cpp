// Drives libmllm_deploy_trt_plugins.so through TensorRT's plugin interfaces on the host only (no libnvinfer,
// no GPU): formats, output types, serialised fields and logging. Built and run by tests/test_trt_headers.py.
#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{
int gFailures = 0;

void expect(bool ok, std::string const& what)
{
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
    gFailures += ok ? 0 : 1;
}

void expectEq(std::string const& actual, std::string const& wanted, std::string const& what)
{
    expect(actual == wanted, what + ": " + actual + (actual == wanted ? "" : " (wanted " + wanted + ")"));
}

class Logger final : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kERROR)
            errors.emplace_back(msg);
    }
    bool saw(char const* text) const
    {
        for (auto const& e : errors)
            if (e.find(text) != std::string::npos)
                return true;
        return false;
    }
    std::vector<std::string> errors;
};

class Finder final : public ILoggerFinder
{
public:
    explicit Finder(ILogger* logger) : mLogger(logger) {}
    ILogger* findLogger() override { return mLogger; }

private:
    ILogger* mLogger;
};

std::vector<std::pair<DataType, char const*>> const kTypes{{DataType::kFLOAT, "FLOAT"}, {DataType::kHALF, "HALF"},
    {DataType::kBF16, "BF16"}, {DataType::kFP8, "FP8"}, {DataType::kINT8, "INT8"}, {DataType::kUINT8, "UINT8"},
    {DataType::kINT32, "INT32"}, {DataType::kINT64, "INT64"}, {DataType::kBOOL, "BOOL"}};

std::string typeName(DataType type)
{
    for (auto const& t : kTypes)
        if (t.first == type)
            return t.second;
    return "other";
}

// The types supportsFormatCombination accepts at `pos`, the other positions set as in `config`.
std::string accepted(IPluginV3OneBuild* build, std::vector<DataType> const& config, int32_t nbInputs, int32_t pos,
    TensorFormat format = TensorFormat::kLINEAR)
{
    std::vector<DynamicPluginTensorDesc> io(config.size());
    for (size_t i = 0; i < config.size(); ++i)
    {
        io[i].desc.type = config[i];
        io[i].desc.format = TensorFormat::kLINEAR;
    }
    io[pos].desc.format = format;
    std::string out;
    for (auto const& t : kTypes)
    {
        io[pos].desc.type = t.first;
        if (build->supportsFormatCombination(pos, io.data(), nbInputs, static_cast<int32_t>(config.size()) - nbInputs))
            out += (out.empty() ? "" : ",") + std::string(t.second);
    }
    return out.empty() ? "none" : out;
}

std::string outputTypes(IPluginV3OneBuild* build, std::vector<DataType> const& inputs, int32_t nbOutputs)
{
    std::vector<DataType> out(nbOutputs, DataType::kBOOL);
    if (build->getOutputDataTypes(out.data(), nbOutputs, inputs.data(), static_cast<int32_t>(inputs.size())) != 0)
        return "error";
    std::string text;
    for (DataType t : out)
        text += (text.empty() ? "" : ",") + typeName(t);
    return text;
}

struct Fields
{
    std::vector<PluginField> list;
    PluginFieldCollection fc{};
    PluginFieldCollection const* get()
    {
        fc.nbFields = static_cast<int32_t>(list.size());
        fc.fields = list.data();
        return &fc;
    }
};

TensorRTPhase const kBuild = TensorRTPhase::kBUILD;

PluginField int32Field(char const* name, int32_t const* value)
{
    return PluginField(name, value, PluginFieldType::kINT32, 1);
}

template <typename T>
T* capability(IPluginV3* plugin, PluginCapabilityType type)
{
    return static_cast<T*>(plugin->getCapabilityInterface(type));
}

// The fields a plugin serializes, re-read by its creator, give an equal plugin (same fields again).
void roundTrip(IPluginCreatorV3One* creator, IPluginV3* plugin, std::string const& wantedNames)
{
    auto* runtime = capability<IPluginV3OneRuntime>(plugin, PluginCapabilityType::kRUNTIME);
    PluginFieldCollection const* fc = runtime->getFieldsToSerialize();
    std::string names;
    for (int32_t i = 0; i < fc->nbFields; ++i)
        names += (i ? "," : "") + std::string(fc->fields[i].name);
    expectEq(names, wantedNames, std::string(creator->getPluginName()) + " serialized fields");
    IPluginV3* again = creator->createPlugin("again", fc, TensorRTPhase::kRUNTIME);
    expect(again != nullptr, std::string(creator->getPluginName()) + " re-created from its serialized fields");
    if (again == nullptr)
        return;
    auto* runtime2 = capability<IPluginV3OneRuntime>(again, PluginCapabilityType::kRUNTIME);
    PluginFieldCollection const* fc2 = runtime2->getFieldsToSerialize();
    bool same = fc2->nbFields == fc->nbFields;
    for (int32_t i = 0; same && i < fc->nbFields; ++i)
    {
        PluginField const& a = fc->fields[i];
        PluginField const& b = fc2->fields[i];
        size_t bytes = a.type == PluginFieldType::kCHAR ? a.length : 4;
        same = std::strcmp(a.name, b.name) == 0 && a.type == b.type && a.length == b.length
            && std::memcmp(a.data, b.data, bytes) == 0;
    }
    expect(same, std::string(creator->getPluginName()) + " serialized fields survive a round trip");
    IPluginV3* copy = again->clone();
    expect(copy != nullptr, std::string(creator->getPluginName()) + " clone");
    delete copy;
    delete again;
}
} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
        return 2;
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr)
    {
        std::printf("FAIL dlopen: %s\n", dlerror());
        return 1;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
    if (getCreators == nullptr || setLoggerFinder == nullptr)
    {
        std::printf("FAIL entry points missing\n");
        return 1;
    }
    Logger logger;
    Finder finder(&logger);
    setLoggerFinder(&finder);

    int32_t nbCreators = -1;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    expectEq(std::to_string(nbCreators), "3", "creator count");
    std::map<std::string, IPluginCreatorV3One*> byName;
    for (int32_t i = 0; i < nbCreators; ++i)
    {
        InterfaceInfo info = creators[i]->getInterfaceInfo();
        expect(std::strstr(info.kind, "CREATOR_V3ONE") != nullptr && info.major == 1,
            std::string("creator interface ") + info.kind);
        auto* creator = static_cast<IPluginCreatorV3One*>(creators[i]);
        std::string const name = creator->getPluginName();
        expectEq(creator->getPluginNamespace(), "mllm_deploy", name + " namespace");
        expectEq(creator->getPluginVersion(), "1", name + " version");
        byName[creator->getPluginName()] = creator;
    }
    if (byName.size() != 3 || !byName.count("TokenSelect") || !byName.count("TokenScatter")
        || !byName.count("VisualScore"))
    {
        std::printf("FAIL creators are not TokenSelect, TokenScatter, VisualScore\n");
        return 1;
    }
    DataType const F = DataType::kFLOAT, H = DataType::kHALF, I64 = DataType::kINT64;

    // ---- TokenSelect (scores, vis_start, data, positions) -> (data_out, positions_out, rows_out)
    {
        IPluginCreatorV3One* creator = byName["TokenSelect"];
        int32_t k = 2, nVis = 4, tooMany = 5;
        Fields good;
        good.list = {int32Field("k", &k), int32Field("n_vis", &nVis)};
        IPluginV3* plugin = creator->createPlugin("select", good.get(), TensorRTPhase::kBUILD);
        expect(plugin != nullptr, "TokenSelect created (k=2, n_vis=4)");
        if (plugin != nullptr)
        {
            auto* build = capability<IPluginV3OneBuild>(plugin, PluginCapabilityType::kBUILD);
            auto* core = capability<IPluginV3OneCore>(plugin, PluginCapabilityType::kCORE);
            expectEq(core->getPluginName(), "TokenSelect", "TokenSelect core name");
            expectEq(std::to_string(build->getNbOutputs()), "3", "TokenSelect outputs");
            std::vector<DataType> const fp16{F, I64, H, I64, H, I64, I64};
            std::vector<DataType> const fp32{F, I64, F, I64, F, I64, I64};
            expectEq(accepted(build, fp16, 4, 0), "FLOAT", "TokenSelect scores, fp16 data");
            expectEq(accepted(build, fp32, 4, 0), "FLOAT", "TokenSelect scores, fp32 data");
            expectEq(accepted(build, fp16, 4, 1), "INT64", "TokenSelect vis_start");
            expectEq(accepted(build, fp16, 4, 2), "FLOAT,HALF", "TokenSelect data");
            expectEq(accepted(build, fp16, 4, 3), "INT64", "TokenSelect positions");
            expectEq(accepted(build, fp16, 4, 4), "HALF", "TokenSelect data_out, fp16 data");
            expectEq(accepted(build, fp32, 4, 4), "FLOAT", "TokenSelect data_out, fp32 data");
            expectEq(accepted(build, fp16, 4, 5), "INT64", "TokenSelect positions_out");
            expectEq(accepted(build, fp16, 4, 6), "INT64", "TokenSelect rows_out");
            for (int32_t pos = 0; pos < 7; ++pos)
                expectEq(accepted(build, fp16, 4, pos, TensorFormat::kHWC8), "none",
                    "TokenSelect non-linear format at " + std::to_string(pos));
            expectEq(outputTypes(build, {F, I64, H, I64}, 3), "HALF,INT64,INT64", "TokenSelect output types, fp16");
            expectEq(outputTypes(build, {F, I64, F, I64}, 3), "FLOAT,INT64,INT64", "TokenSelect output types, fp32");
            roundTrip(creator, plugin, "k,n_vis");
            delete plugin;
        }
        Fields bad;
        bad.list = {int32Field("k", &tooMany), int32Field("n_vis", &nVis)};
        expect(creator->createPlugin("bad", bad.get(), kBuild) == nullptr, "TokenSelect refuses k > n_vis");
        expect(logger.saw("TokenSelect"), "TokenSelect's refusal reaches the logger");
        Fields partial;
        partial.list = {int32Field("k", &k)};
        expect(creator->createPlugin("bad", partial.get(), kBuild) == nullptr, "TokenSelect refuses a missing n_vis");
        expect(logger.saw("n_vis"), "the missing field is named in the log");
    }

    // ---- TokenScatter (base, updates, rows[, skip_scale]) -> out
    {
        IPluginCreatorV3One* creator = byName["TokenScatter"];
        Fields none;
        IPluginV3* plugin = creator->createPlugin("scatter", none.get(), TensorRTPhase::kBUILD);
        expect(plugin != nullptr, "TokenScatter created");
        if (plugin != nullptr)
        {
            auto* build = capability<IPluginV3OneBuild>(plugin, PluginCapabilityType::kBUILD);
            std::vector<DataType> const fp16{H, H, I64, H, H};
            expectEq(accepted(build, fp16, 4, 0), "FLOAT,HALF", "TokenScatter base");
            expectEq(accepted(build, fp16, 4, 1), "HALF", "TokenScatter updates, fp16 base");
            expectEq(accepted(build, fp16, 4, 2), "INT64", "TokenScatter rows");
            expectEq(accepted(build, fp16, 4, 3), "HALF", "TokenScatter skip_scale, fp16 base");
            expectEq(accepted(build, fp16, 4, 4), "HALF", "TokenScatter out, fp16 base");
            expectEq(outputTypes(build, {H, H, I64}, 1), "HALF", "TokenScatter output type");
            roundTrip(creator, plugin, "");
            delete plugin;
        }
    }

    // ---- VisualScore (q, k, positions, vis_start) -> scores
    {
        IPluginCreatorV3One* creator = byName["VisualScore"];
        int32_t nVis = 4;
        float scale = 0.125f;
        char const* rows = "visual_and_text";
        char const* bogus = "bogus_rows";
        auto fields = [&](char const* queryRows) {
            Fields f;
            auto const length = static_cast<int32_t>(std::strlen(queryRows));
            f.list = {int32Field("n_vis", &nVis), PluginField("query_rows", queryRows, PluginFieldType::kCHAR, length),
                PluginField("head_reduction", "max", PluginFieldType::kCHAR, 3),
                PluginField("combine", "self_times_cross", PluginFieldType::kCHAR, 16),
                PluginField("scale", &scale, PluginFieldType::kFLOAT32, 1)};
            return f;
        };
        Fields good = fields(rows);
        IPluginV3* plugin = creator->createPlugin("score", good.get(), TensorRTPhase::kBUILD);
        expect(plugin != nullptr, "VisualScore created");
        if (plugin != nullptr)
        {
            auto* build = capability<IPluginV3OneBuild>(plugin, PluginCapabilityType::kBUILD);
            std::vector<DataType> const fp16{H, H, I64, I64, F};
            std::vector<DataType> const fp32{F, F, I64, I64, F};
            expectEq(accepted(build, fp16, 4, 0), "FLOAT,HALF", "VisualScore q");
            expectEq(accepted(build, fp16, 4, 1), "HALF", "VisualScore k, fp16 q");
            expectEq(accepted(build, fp16, 4, 2), "INT64", "VisualScore positions");
            expectEq(accepted(build, fp16, 4, 3), "INT64", "VisualScore vis_start");
            expectEq(accepted(build, fp16, 4, 4), "FLOAT", "VisualScore scores, fp16 q/k");
            expectEq(accepted(build, fp32, 4, 4), "FLOAT", "VisualScore scores, fp32 q/k");
            expectEq(outputTypes(build, {H, H, I64, I64}, 1), "FLOAT", "VisualScore output type, fp16 q/k");
            expectEq(outputTypes(build, {F, F, I64, I64}, 1), "FLOAT", "VisualScore output type, fp32 q/k");
            std::vector<DynamicPluginTensorDesc> in(4), out(1);
            for (auto* d : {&in[0], &in[1]})
            {
                d->max.nbDims = 4;
                d->max.d[0] = 1;
                d->max.d[1] = 2;
                d->max.d[2] = 100;
                d->max.d[3] = 64;
            }
            int32_t const configured = build->configurePlugin(in.data(), 4, out.data(), 1);
            expectEq(std::to_string(configured), "0", "VisualScore configures");
            expect(build->getWorkspaceSize(in.data(), 4, out.data(), 1) >= 100 * 4 * sizeof(float),
                "VisualScore workspace holds [q rows, n_vis] floats");
            roundTrip(creator, plugin, "n_vis,query_rows,head_reduction,combine,scale");
            delete plugin;
        }
        Fields bad = fields(bogus);
        expect(creator->createPlugin("bad", bad.get(), kBuild) == nullptr, "VisualScore refuses a bad query_rows");
        expect(logger.saw("query_rows"), "the bad field is named in the log");
    }

    std::printf("%d failure(s)\n", gFailures);
    return gFailures == 0 ? 0 : 1;
}
